// RMSNorm on CPU: forward, backward and the fused residual add (see rms_norm.h).
//
// One row ([H] elements) is read from memory once and then stays in L1 while the kernel
// makes its passes over it (statistics, then output); the output pass prefetches the next row,
// so that its memory reads overlap the arithmetic. Rows are spread over threads with
// at::parallel_for; the per-row loops are MMK_VECTORIZED. The weight is turned into an fp32
// scale vector once per call, with the roundings of the reference implementation. Outputs larger
// than the caches are written with non-temporal stores (stream_store.h).
#include "rms_norm.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx512_bf16.h"
#include "cpu_dispatch.h"
#include "dispatch_types.h"
#include "dtype_convert.h"
#include "huge_page_alloc.h"
#include "stream_store.h"

namespace mmk {
namespace {

// Sums over a row accumulate in kLanes independent fp32 partial sums, added in a fixed
// order at the end, so every vector width gives the same association of the terms.
constexpr int64_t kLanes = 32;
// The weight gradient is summed over at most kMaxGradBlocks blocks of rows (each at least
// kMinRowsPerGradBlock rows, summed in row order), then over the blocks in block order:
// the blocking depends on the row count only, never on the thread count.
constexpr int64_t kMaxGradBlocks = 64;
constexpr int64_t kMinRowsPerGradBlock = 8;
// Elements per at::parallel_for task over rows (the ATen default grain), and columns per
// task of the final weight-gradient sum.
constexpr int64_t kGrainElements = 32768;
constexpr int64_t kGrainColumns = 1024;

enum class Casting { kLlama, kGemma, kNone };

Casting parse_casting(std::string_view casting) {
  if (casting == "llama") return Casting::kLlama;
  if (casting == "gemma") return Casting::kGemma;
  TORCH_CHECK(casting == "none", "rms_norm: casting must be 'llama', 'gemma' or 'none', got '", casting, "'");
  return Casting::kNone;
}

inline float sum_lanes(const float* acc) {
  float total = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Rounds an fp32 value to T and back (identity for float).
template <typename T>
inline float round_to(float v) {
  return load_f32(store_as<T>(v));
}

template <typename T>
MMK_VECTORIZED float sum_squares(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = load_f32(x[i + j]);
      acc[j] += v * v;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const float v = load_f32(x[i + j]);
    acc[j] += v * v;
  }
  return sum_lanes(acc);
}

// sum = x + residual (rounded to T, as the reference adds in x.dtype); returns sum(sum^2).
template <typename T>
MMK_VECTORIZED float add_sum_squares(const T* x, const T* residual, T* sum, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = round_to<T>(load_f32(x[i + j]) + load_f32(residual[i + j]));
      sum[i + j] = store_as<T>(v);
      acc[j] += v * v;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const float v = round_to<T>(load_f32(x[i + j]) + load_f32(residual[i + j]));
    sum[i + j] = store_as<T>(v);
    acc[j] += v * v;
  }
  return sum_lanes(acc);
}

// Elements per cache line: the output loops prefetch the next row one line per line of output.
template <typename T>
constexpr int64_t kLineElems = 64 / static_cast<int64_t>(sizeof(T));

// y = (x * r, rounded to T when kRoundNorm) * scale; prefetches `next` (the same span of the row
// processed after this one) as it goes.
template <typename T, bool kRoundNorm>
MMK_VECTORIZED void normalize_row(const T* x, const float* scale, float r, T* y, int64_t n, const T* next) {
  const auto one = [&](int64_t i) {
    float v = load_f32(x[i]) * r;
    if constexpr (kRoundNorm) v = round_to<T>(v);
    y[i] = store_as<T>(v * scale[i]);
  };
  int64_t i = 0;
  for (; i + kLineElems<T> <= n; i += kLineElems<T>) {
    __builtin_prefetch(next + i);
    for (int64_t j = 0; j < kLineElems<T>; ++j) one(i + j);
  }
  for (; i < n; ++i) one(i);
}

// sum over the row of g * n with g = dy * gscale and n = x * r.
template <typename T>
MMK_VECTORIZED float grad_dot(const T* dy, const T* x, const float* gscale, float r, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      acc[j] += (load_f32(dy[i + j]) * gscale[i + j]) * (load_f32(x[i + j]) * r);
    }
  }
  for (int64_t j = 0; i + j < n; ++j) acc[j] += (load_f32(dy[i + j]) * gscale[i + j]) * (load_f32(x[i + j]) * r);
  return sum_lanes(acc);
}

// dx = r * (g - n * mean_gn), and with kWeight also dweight_acc += dy * n (n rounded to T when
// kRoundNorm); prefetches the next row's dy and x (next_dy, next_x) as it goes.
template <typename T, bool kWeight, bool kRoundNorm>
MMK_VECTORIZED void grad_row(const T* dy, const T* x, const float* gscale, float r, float mean_gn, T* dx,
                             float* dweight_acc, int64_t n, const T* next_dy, const T* next_x) {
  const auto one = [&](int64_t i) {
    const float g = load_f32(dy[i]);
    const float norm = load_f32(x[i]) * r;
    dx[i] = store_as<T>(r * (g * gscale[i] - norm * mean_gn));
    if constexpr (kWeight) dweight_acc[i] += g * (kRoundNorm ? round_to<T>(norm) : norm);
  };
  int64_t i = 0;
  for (; i + kLineElems<T> <= n; i += kLineElems<T>) {
    __builtin_prefetch(next_dy + i);
    __builtin_prefetch(next_x + i);
    for (int64_t j = 0; j < kLineElems<T>; ++j) one(i + j);
  }
  for (; i < n; ++i) one(i);
}

MMK_VECTORIZED void add_into(float* acc, const float* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += values[i];
}

// The row loops the kernels call: for bf16 the AVX-512 BF16 ones where the CPU has them
// (avx512_bf16.h), else the clones above.
template <typename T>
constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;

template <typename T>
float row_sum_squares(const T* x, int64_t n) {
  if constexpr (kBF16<T>) {
    if (avx512::supported()) return avx512::sum_squares(x, n);
  }
  return sum_squares(x, n);
}

template <typename T>
void row_normalize(const T* x, const float* scale, float r, T* y, int64_t n, const T* next, bool round_norm) {
  if constexpr (kBF16<T>) {
    if (avx512::supported()) return avx512::normalize_row(x, scale, r, y, n, next, round_norm);
  }
  if (round_norm) return normalize_row<T, true>(x, scale, r, y, n, next);
  normalize_row<T, false>(x, scale, r, y, n, next);
}

template <typename T>
float row_grad_dot(const T* dy, const T* x, const float* gscale, float r, int64_t n) {
  if constexpr (kBF16<T>) {
    if (avx512::supported()) return avx512::grad_dot(dy, x, gscale, r, n);
  }
  return grad_dot(dy, x, gscale, r, n);
}

// dweight_acc null: no weight gradient.
template <typename T>
void row_grad(const T* dy, const T* x, const float* gscale, float r, float mean_gn, T* dx, float* dweight_acc,
              int64_t n, const T* next_dy, const T* next_x, bool round_norm) {
  if constexpr (kBF16<T>) {
    if (avx512::supported()) {
      return avx512::grad_row(dy, x, gscale, r, mean_gn, dx, dweight_acc, n, next_dy, next_x, round_norm);
    }
  }
  if (dweight_acc == nullptr) return grad_row<T, false, false>(dy, x, gscale, r, mean_gn, dx, nullptr, n, next_dy, next_x);
  if (round_norm) return grad_row<T, true, true>(dy, x, gscale, r, mean_gn, dx, dweight_acc, n, next_dy, next_x);
  grad_row<T, true, false>(dy, x, gscale, r, mean_gn, dx, dweight_acc, n, next_dy, next_x);
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.defined(), "rms_norm: ", name, " is undefined");
  TORCH_CHECK(x.device().is_cpu(), "rms_norm: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "rms_norm: ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "rms_norm: ", name, " must have shape [..., H] with H >= 1, got ",
              x.sizes());
}

void check_weight(const std::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value() || !weight->defined()) return;
  TORCH_CHECK(weight->device().is_cpu(), "rms_norm: weight must be a CPU tensor, got ", weight->device());
  TORCH_CHECK(at::isFloatingType(weight->scalar_type()), "rms_norm: weight must be a floating-point tensor, got ",
              weight->scalar_type());
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), "rms_norm: weight must have shape [H] = [",
              x.size(-1), "], got ", weight->sizes());
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_x(t, name);
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), "rms_norm: ", name,
              " must match x (shape ", x.sizes(), ", dtype ", x.scalar_type(), "), got shape ", t.sizes(),
              ", dtype ", t.scalar_type());
}

bool has_weight(const std::optional<at::Tensor>& weight) { return weight.has_value() && weight->defined(); }

// The fp32 factor the forward multiplies by, (offset + weight) rounded as the reference rounds
// it: in weight.dtype then x.dtype (T), or straight to fp32 for gemma; ones without a weight
// (multiplying by 1 and rounding again changes nothing).
template <typename T>
std::vector<float> forward_scale(const std::optional<at::Tensor>& weight, Casting casting, double offset,
                                 int64_t hidden) {
  std::vector<float> scale(hidden, 1.0f);
  if (!has_weight(weight)) return scale;
  const float off = static_cast<float>(offset);
  if (weight->scalar_type() == c10::CppTypeToScalarType<T>::value && weight->is_contiguous()) {
    const T* w = weight->const_data_ptr<T>();
    for (int64_t i = 0; i < hidden; ++i) {
      scale[i] = casting == Casting::kGemma ? load_f32(w[i]) + off : round_to<T>(load_f32(w[i]) + off);
    }
    return scale;
  }
  const at::Tensor mixed = casting == Casting::kGemma
                               ? (weight->to(at::kFloat) + offset).contiguous()
                               : (*weight + offset).to(c10::CppTypeToScalarType<T>::value).to(at::kFloat).contiguous();
  std::copy_n(mixed.const_data_ptr<float>(), hidden, scale.data());
  return scale;
}

int64_t grain_rows(int64_t hidden) { return std::max<int64_t>(1, kGrainElements / hidden); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                double eps, std::string_view casting_name, double offset) {
  check_x(x_in, "x");
  check_weight(weight, x_in);
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be >= 0, got ", eps);
  const Casting casting = parse_casting(casting_name);
  const at::Tensor x = x_in.contiguous();
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  at::Tensor y = empty_huge_page_advised(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const float eps_f = static_cast<float>(eps);
  const bool streaming = use_streaming_stores(y.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::rms_norm_fwd", [&] {
    using T = scalar_t;
    const std::vector<float> scale = forward_scale<T>(weight, casting, offset, hidden);
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    float* rp = rstd.mutable_data_ptr<float>();
    const bool round_norm = casting != Casting::kGemma;
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
      constexpr int64_t chunk = kStreamChunkBytes / sizeof(T);
      alignas(64) T buf[chunk];
      for (int64_t row = begin; row < end; ++row) {
        const T* xr = xp + row * hidden;
        const T* next = row + 1 < end ? xr + hidden : xr;
        const float r = 1.f / std::sqrt(row_sum_squares(xr, hidden) / static_cast<float>(hidden) + eps_f);
        rp[row] = r;
        // casting "none" multiplies by rstd rounded to x.dtype.
        const float r_used = casting == Casting::kNone ? round_to<T>(r) : r;
        T* yr = yp + row * hidden;
        if (!streaming) {
          row_normalize(xr, scale.data(), r_used, yr, hidden, next, round_norm);
          continue;
        }
        for (int64_t col = 0; col < hidden; col += chunk) {
          const int64_t len = std::min(chunk, hidden - col);
          row_normalize(xr + col, scale.data() + col, r_used, buf, len, next + col, round_norm);
          stream_copy(yr + col, buf, len * sizeof(T));
        }
      }
      if (streaming) stream_fence();
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd_in,
                                                double eps, std::string_view casting_name, double offset) {
  check_x(x_in, "x");
  check_same(dy_in, x_in, "dy");
  check_weight(weight, x_in);
  TORCH_CHECK(rstd_in.defined() && rstd_in.device().is_cpu() && rstd_in.scalar_type() == at::kFloat &&
                  rstd_in.numel() * x_in.size(-1) == x_in.numel(),
              "rms_norm: rstd must be a float32 CPU tensor with one value per row of x (",
              x_in.numel() / x_in.size(-1), "), got ", rstd_in.scalar_type(), " ", rstd_in.sizes());
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be >= 0, got ", eps);
  const Casting casting = parse_casting(casting_name);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  at::Tensor dx = empty_huge_page_advised(x.sizes(), x.options());
  const bool with_weight = has_weight(weight);
  const bool streaming = use_streaming_stores(dx.nbytes());
  const int64_t blocks = rows == 0 ? 0 : std::min(kMaxGradBlocks, ceil_div(rows, kMinRowsPerGradBlock));
  const int64_t rows_per_block = blocks == 0 ? 0 : ceil_div(rows, blocks);
  at::Tensor partial = with_weight ? at::empty({blocks, hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::rms_norm_bwd", [&] {
    using T = scalar_t;
    // The gradient's factor is offset + weight in fp32 for every casting mode: gemma's forward factor.
    const std::vector<float> gscale = forward_scale<T>(weight, Casting::kGemma, offset, hidden);
    const T* xp = x.const_data_ptr<T>();
    const T* dyp = dy.const_data_ptr<T>();
    const float* rp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    float* partial_ptr = with_weight ? partial.mutable_data_ptr<float>() : nullptr;
    const bool round_norm = casting == Casting::kLlama;
    // Blocks per task: about kGrainElements elements, so that small inputs stay on one thread.
    const int64_t grain_blocks = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, rows_per_block * hidden));
    at::parallel_for(0, blocks, grain_blocks, [&](int64_t block_begin, int64_t block_end) {
      constexpr int64_t chunk = kStreamChunkBytes / sizeof(T);
      alignas(64) T buf[chunk];
      for (int64_t block = block_begin; block < block_end; ++block) {
        float* acc = with_weight ? partial_ptr + block * hidden : nullptr;
        if (acc != nullptr) std::fill(acc, acc + hidden, 0.f);
        const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
        for (int64_t row = block * rows_per_block; row < row_end; ++row) {
          const int64_t off = row * hidden;
          const int64_t next = row + 1 < row_end ? off + hidden : off;
          const float r = rp[row];
          const float mean_gn =
              row_grad_dot(dyp + off, xp + off, gscale.data(), r, hidden) / static_cast<float>(hidden);
          if (!streaming) {
            row_grad(dyp + off, xp + off, gscale.data(), r, mean_gn, dxp + off, acc, hidden, dyp + next, xp + next,
                     round_norm);
            continue;
          }
          for (int64_t col = 0; col < hidden; col += chunk) {
            const int64_t len = std::min(chunk, hidden - col);
            row_grad(dyp + off + col, xp + off + col, gscale.data() + col, r, mean_gn, buf,
                     acc == nullptr ? nullptr : acc + col, len, dyp + next + col, xp + next + col, round_norm);
            stream_copy(dxp + off + col, buf, len * sizeof(T));
          }
        }
      }
      if (streaming) stream_fence();
    });
  });
  if (!with_weight) return {dx, at::empty({0}, x.options())};
  if (blocks == 0) return {dx, at::zeros_like(*weight, at::MemoryFormat::Contiguous)};
  // Sum the block partials in block order, columns in parallel (about kGrainElements sums per task).
  float* partial_ptr = partial.mutable_data_ptr<float>();
  const int64_t grain_columns = std::max(kGrainColumns, kGrainElements / blocks);
  at::parallel_for(0, hidden, grain_columns, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t block = 1; block < blocks; ++block) {
      add_into(partial_ptr + col_begin, partial_ptr + block * hidden + col_begin, col_end - col_begin);
    }
  });
  return {dx, partial[0].to(weight->scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x_in, const at::Tensor& residual_in,
                                                                const std::optional<at::Tensor>& weight,
                                                                double eps) {
  check_x(x_in, "x");
  check_same(residual_in, x_in, "residual");
  check_weight(weight, x_in);
  TORCH_CHECK(eps >= 0.0, "rms_norm: eps must be >= 0, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const int64_t hidden = x.size(-1);
  const int64_t rows = x.numel() / hidden;
  at::Tensor y = empty_huge_page_advised(x.sizes(), x.options());
  at::Tensor summed = empty_huge_page_advised(x.sizes(), x.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const float eps_f = static_cast<float>(eps);
  const bool streaming = use_streaming_stores(y.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::add_rms_norm_fwd", [&] {
    using T = scalar_t;
    const std::vector<float> scale = forward_scale<T>(weight, Casting::kLlama, 0.0, hidden);
    const T* xp = x.const_data_ptr<T>();
    const T* resp = residual.const_data_ptr<T>();
    T* sp = summed.mutable_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    float* rp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
      // Streaming: the sum of a row is built here, then copied out with the normalised row.
      std::vector<T> row_sum(streaming ? hidden : 0);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * hidden;
        T* sum = streaming ? row_sum.data() : sp + off;
        const float sumsq = add_sum_squares(xp + off, resp + off, sum, hidden);
        const float r = 1.f / std::sqrt(sumsq / static_cast<float>(hidden) + eps_f);
        rp[row] = r;
        const T* next = row + 1 < end ? xp + off + hidden : xp + off;
        if (!streaming) {
          row_normalize(sum, scale.data(), r, yp + off, hidden, next, true);
          continue;
        }
        stream_copy(sp + off, sum, hidden * sizeof(T));
        constexpr int64_t chunk = kStreamChunkBytes / sizeof(T);
        alignas(64) T buf[chunk];
        for (int64_t col = 0; col < hidden; col += chunk) {
          const int64_t len = std::min(chunk, hidden - col);
          row_normalize(sum + col, scale.data() + col, r, buf, len, next + col, true);
          stream_copy(yp + off + col, buf, len * sizeof(T));
        }
      }
      if (streaming) stream_fence();
    });
  });
  return {y, rstd, summed};
}

TORCH_LIBRARY_FRAGMENT(mm_kernels_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps, str casting, float offset) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, float eps, str casting, float offset)"
      " -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
}

// Registers the kernels into the library m: the operators of mm_kernels_cpu (defined above) and the
// CPU kernels of the mm_kernels operators (defined by mm_kernels.contract) share names.
namespace {

void register_rms_norm_kernels(torch::Library& m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(mm_kernels_cpu, CPU, m) { register_rms_norm_kernels(m); }

TORCH_LIBRARY_IMPL(mm_kernels, CPU, m) { register_rms_norm_kernels(m); }

}  // namespace mmk
