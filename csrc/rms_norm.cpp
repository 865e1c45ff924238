// RMSNorm on CPU: forward, backward and the fused residual add (see rms_norm.h).
//
// One row ([H] elements) is read from memory once and then stays in L1 while the kernel
// makes its passes over it (statistics, then output). Rows are spread over threads with
// at::parallel_for; the per-row loops are MMK_VECTORIZED. The weight is turned into an
// fp32 scale vector once per call, with the roundings of the reference implementation.
#include "rms_norm.h"

#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_dispatch.h"
#include "dispatch_types.h"
#include "dtype_convert.h"
#include "huge_page_alloc.h"

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

// y = (x * r, rounded to T when kRoundNorm) * scale; scale may be null (no weight).
template <typename T, bool kRoundNorm>
MMK_VECTORIZED void normalize_row(const T* x, const float* scale, float r, T* y, int64_t n) {
  if (scale == nullptr) {
    for (int64_t i = 0; i < n; ++i) y[i] = store_as<T>(load_f32(x[i]) * r);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    float v = load_f32(x[i]) * r;
    if constexpr (kRoundNorm) v = round_to<T>(v);
    y[i] = store_as<T>(v * scale[i]);
  }
}

// sum over the row of g * n with g = dy * gscale (dy without weight) and n = x * r.
template <typename T>
MMK_VECTORIZED float grad_dot(const T* dy, const T* x, const float* gscale, float r, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  if (gscale == nullptr) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) acc[j] += load_f32(dy[i + j]) * (load_f32(x[i + j]) * r);
    }
    for (int64_t j = 0; i + j < n; ++j) acc[j] += load_f32(dy[i + j]) * (load_f32(x[i + j]) * r);
    return sum_lanes(acc);
  }
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      acc[j] += (load_f32(dy[i + j]) * gscale[i + j]) * (load_f32(x[i + j]) * r);
    }
  }
  for (int64_t j = 0; i + j < n; ++j) acc[j] += (load_f32(dy[i + j]) * gscale[i + j]) * (load_f32(x[i + j]) * r);
  return sum_lanes(acc);
}

// dx = r * (g - n * mean_gn); with a weight also dweight_acc += dy * n (n rounded to T when
// kRoundNorm). gscale and dweight_acc are both null or both set.
template <typename T, bool kRoundNorm>
MMK_VECTORIZED void grad_row(const T* dy, const T* x, const float* gscale, float r, float mean_gn, T* dx,
                             float* dweight_acc, int64_t n) {
  if (gscale == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float norm = load_f32(x[i]) * r;
      dx[i] = store_as<T>(r * (load_f32(dy[i]) - norm * mean_gn));
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float g = load_f32(dy[i]);
    const float norm = load_f32(x[i]) * r;
    dx[i] = store_as<T>(r * (g * gscale[i] - norm * mean_gn));
    dweight_acc[i] += g * (kRoundNorm ? round_to<T>(norm) : norm);
  }
}

MMK_VECTORIZED void add_into(float* acc, const float* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += values[i];
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

// The fp32 factor the forward multiplies by: (offset + weight) rounded as the reference
// rounds it (in weight.dtype then x.dtype, or straight to fp32 for gemma); undefined without weight.
at::Tensor forward_scale(const std::optional<at::Tensor>& weight, Casting casting, double offset,
                         at::ScalarType x_dtype) {
  if (!has_weight(weight)) return {};
  if (casting == Casting::kGemma) return (weight->to(at::kFloat) + offset).contiguous();
  return (*weight + offset).to(x_dtype).to(at::kFloat).contiguous();
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
  const at::Tensor scale = forward_scale(weight, casting, offset, x.scalar_type());
  const float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float eps_f = static_cast<float>(eps);
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::rms_norm_fwd", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    float* rp = rstd.mutable_data_ptr<float>();
    const bool round_norm = casting != Casting::kGemma;
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* xr = xp + row * hidden;
        const float r = 1.f / std::sqrt(sum_squares(xr, hidden) / static_cast<float>(hidden) + eps_f);
        rp[row] = r;
        // casting "none" multiplies by rstd rounded to x.dtype.
        const float r_used = casting == Casting::kNone ? round_to<T>(r) : r;
        if (round_norm) {
          normalize_row<T, true>(xr, scale_ptr, r_used, yp + row * hidden, hidden);
        } else {
          normalize_row<T, false>(xr, scale_ptr, r_used, yp + row * hidden, hidden);
        }
      }
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
  // The gradient scale is (offset + weight) in fp32 for every casting mode.
  const at::Tensor gscale = with_weight ? (weight->to(at::kFloat) + offset).contiguous() : at::Tensor();
  const float* gscale_ptr = with_weight ? gscale.const_data_ptr<float>() : nullptr;

  const int64_t blocks = rows == 0 ? 0 : std::min(kMaxGradBlocks, ceil_div(rows, kMinRowsPerGradBlock));
  const int64_t rows_per_block = blocks == 0 ? 0 : ceil_div(rows, blocks);
  at::Tensor partial = with_weight ? at::empty({blocks, hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::rms_norm_bwd", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* dyp = dy.const_data_ptr<T>();
    const float* rp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    float* partial_ptr = with_weight ? partial.mutable_data_ptr<float>() : nullptr;
    const bool round_norm = casting == Casting::kLlama;
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        float* acc = with_weight ? partial_ptr + block * hidden : nullptr;
        if (acc != nullptr) std::fill(acc, acc + hidden, 0.f);
        const int64_t row_end = std::min(rows, (block + 1) * rows_per_block);
        for (int64_t row = block * rows_per_block; row < row_end; ++row) {
          const int64_t off = row * hidden;
          const float r = rp[row];
          const float mean_gn = grad_dot(dyp + off, xp + off, gscale_ptr, r, hidden) / static_cast<float>(hidden);
          if (round_norm) {
            grad_row<T, true>(dyp + off, xp + off, gscale_ptr, r, mean_gn, dxp + off, acc, hidden);
          } else {
            grad_row<T, false>(dyp + off, xp + off, gscale_ptr, r, mean_gn, dxp + off, acc, hidden);
          }
        }
      }
    });
  });
  if (!with_weight) return {dx, at::empty({0}, x.options())};
  if (blocks == 0) return {dx, at::zeros_like(*weight, at::MemoryFormat::Contiguous)};
  // Sum the block partials in block order, columns in parallel.
  float* partial_ptr = partial.mutable_data_ptr<float>();
  at::parallel_for(0, hidden, kGrainColumns, [&](int64_t col_begin, int64_t col_end) {
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
  const at::Tensor scale = forward_scale(weight, Casting::kLlama, 0.0, x.scalar_type());
  const float* scale_ptr = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float eps_f = static_cast<float>(eps);
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::add_rms_norm_fwd", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* resp = residual.const_data_ptr<T>();
    T* sp = summed.mutable_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    float* rp = rstd.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain_rows(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * hidden;
        const float sumsq = add_sum_squares(xp + off, resp + off, sp + off, hidden);
        const float r = 1.f / std::sqrt(sumsq / static_cast<float>(hidden) + eps_f);
        rp[row] = r;
        normalize_row<T, true>(sp + off, scale_ptr, r, yp + off, hidden);
      }
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

namespace {

// Registers the kernels into the library m: the operators of mm_kernels_cpu (defined above) and the
// CPU kernels of the mm_kernels operators (defined by mm_kernels.contract) share names.
void register_rms_norm_kernels(torch::Library& m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(mm_kernels_cpu, CPU, m) { register_rms_norm_kernels(m); }

TORCH_LIBRARY_IMPL(mm_kernels, CPU, m) { register_rms_norm_kernels(m); }

}  // namespace mmk
