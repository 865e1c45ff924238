// SwiGLU on CPU: y = silu(a) * b, computed in fp32 for fp32, bf16 and fp16 tensors.
//
// Two forms share one kernel:
//   swiglu_fwd(x, dim): a, b are the halves of x along dim. With x contiguous and viewed as
//     [outer, 2, n] (n = half size * the sizes after dim), a = x[:, 0], b = x[:, 1], y is [outer, n].
//   swiglu_pair_fwd(gate, up): a = gate, b = up, one row of numel elements.
// The work is cut into tiles (one row, up to kTileElems columns) run by at::parallel_for; each
// tile is a contiguous span handled by an MMK_VECTORIZED loop. Outputs larger than the caches are
// computed into an L1 buffer per tile and written with non-temporal stores (stream_store.h). The
// backward recomputes silu from the input: da = dy * b * s * (1 + a * (1 - s)), db = dy * a * s
// with s = sigmoid(a).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "avx512_bf16.h"
#include "activation_math.h"
#include "cpu_dispatch.h"
#include "dispatch_types.h"
#include "dtype_convert.h"
#include "huge_page_alloc.h"
#include "stream_store.h"

namespace mmk {
namespace {

// Columns per tile: two fp32 output buffers of a tile (32 KiB) stay in L1.
constexpr int64_t kTileElems = 4096;
constexpr int64_t kMinElemsPerTask = 32768;

// Elements the loops prefetch ahead in each input, one cache line of them at a time.
constexpr int64_t kPrefetchElems = 1024;

// Runs one(i) for i in [0, n), prefetching kPrefetchElems ahead in each of `inputs`.
template <typename T, typename One, typename... Inputs>
inline __attribute__((always_inline)) void prefetched_loop(int64_t n, const One& one, const Inputs*... inputs) {
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  int64_t i = 0;
  for (; i + line <= n; i += line) {
    (__builtin_prefetch(inputs + i + kPrefetchElems), ...);
    for (int64_t j = 0; j < line; ++j) one(i + j);
  }
  for (; i < n; ++i) one(i);
}

template <typename T>
inline __attribute__((always_inline)) void fwd_span(const T* __restrict__ a, const T* __restrict__ b,
                                                     T* __restrict__ y, int64_t n) {
  prefetched_loop<T>(n, [&](int64_t i) {
    const float av = load_f32(a[i]);
    y[i] = store_as<T>(av * sigmoid_f32(av) * load_f32(b[i]));
  }, a, b);
}

template <typename T>
inline __attribute__((always_inline)) void bwd_span(const T* __restrict__ dy, const T* __restrict__ a,
                                                     const T* __restrict__ b, T* __restrict__ da,
                                                     T* __restrict__ db, int64_t n) {
  prefetched_loop<T>(n, [&](int64_t i) {
    const float av = load_f32(a[i]);
    const float g = load_f32(dy[i]);
    const float s = sigmoid_f32(av);
    const float silu = av * s;
    da[i] = store_as<T>(g * load_f32(b[i]) * (s + silu * (1.0f - s)));
    db[i] = store_as<T>(g * silu);
  }, dy, a, b);
}

// One clone set per dtype: target_clones does not apply to templates.
MMK_VECTORIZED void fwd_kernel(const float* a, const float* b, float* y, int64_t n) { fwd_span(a, b, y, n); }
MMK_VECTORIZED void fwd_kernel(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* y, int64_t n) {
  fwd_span(a, b, y, n);
}
MMK_VECTORIZED void fwd_kernel(const c10::Half* a, const c10::Half* b, c10::Half* y, int64_t n) {
  fwd_span(a, b, y, n);
}

MMK_VECTORIZED void bwd_kernel(const float* dy, const float* a, const float* b, float* da, float* db, int64_t n) {
  bwd_span(dy, a, b, da, db, n);
}
MMK_VECTORIZED void bwd_kernel(const c10::BFloat16* dy, const c10::BFloat16* a, const c10::BFloat16* b,
                               c10::BFloat16* da, c10::BFloat16* db, int64_t n) {
  bwd_span(dy, a, b, da, db, n);
}
MMK_VECTORIZED void bwd_kernel(const c10::Half* dy, const c10::Half* a, const c10::Half* b, c10::Half* da,
                               c10::Half* db, int64_t n) {
  bwd_span(dy, a, b, da, db, n);
}

// Rows of a and b (and of their gradients) sit `in_stride` elements apart; rows of y and dy `n` apart.
struct Layout {
  int64_t rows;
  int64_t n;
  int64_t in_stride;
};

// Calls fn(row, column, length) for every tile of a [rows, n] layout, in parallel; with `streaming`
// each task ends with a store fence.
template <typename Fn>
void for_each_tile(const Layout& layout, bool streaming, const Fn& fn) {
  if (layout.rows == 0 || layout.n == 0) return;
  const int64_t tile = std::min(layout.n, kTileElems);
  const int64_t tiles_per_row = (layout.n + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / tile);
  at::parallel_for(0, layout.rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = t / tiles_per_row;
      const int64_t col = (t % tiles_per_row) * tile;
      fn(row, col, std::min(tile, layout.n - col));
    }
    if (streaming) stream_fence();
  });
}

// compute(out) writes `len` elements of a tile: straight to dst, or with `streaming` into an L1
// buffer that is then streamed to dst.
template <typename T, typename Compute>
void write_tile(T* dst, int64_t len, bool streaming, const Compute& compute) {
  if (!streaming) return compute(dst);
  alignas(64) T buf[kTileElems];
  compute(buf);
  stream_copy(dst, buf, len * sizeof(T));
}

// The same for a tile with two outputs, compute(out_a, out_b).
template <typename T, typename Compute>
void write_tile_pair(T* dst_a, T* dst_b, int64_t len, bool streaming, const Compute& compute) {
  if (!streaming) return compute(dst_a, dst_b);
  alignas(64) T buf_a[kTileElems];
  alignas(64) T buf_b[kTileElems];
  compute(buf_a, buf_b);
  stream_copy(dst_a, buf_a, len * sizeof(T));
  stream_copy(dst_b, buf_b, len * sizeof(T));
}

// The element loops of one tile, written to its outputs. The AVX-512 loops (avx512_bf16.h), where the
// CPU has them, store straight from registers (non-temporal with `streaming`); the clones above
// compute into an L1 buffer first when streaming (write_tile).
template <typename T>
void fwd_tile(const T* a, const T* b, T* y, int64_t n, bool streaming) {
  if (avx512::supported()) return avx512::silu_mul(a, b, y, n, streaming);
  write_tile(y, n, streaming, [&](T* out) { fwd_kernel(a, b, out, n); });
}

template <typename T>
void bwd_tile(const T* dy, const T* a, const T* b, T* da, T* db, int64_t n, bool streaming) {
  if (avx512::supported()) return avx512::silu_mul_bwd(dy, a, b, da, db, n, streaming);
  write_tile_pair(da, db, n, streaming, [&](T* out_a, T* out_b) { bwd_kernel(dy, a, b, out_a, out_b, n); });
}

void check_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "mm_kernels_cpu swiglu: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "mm_kernels_cpu swiglu: ", name, " must be a CPU tensor, got ", t.device());
}

void check_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref,
                at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "mm_kernels_cpu swiglu: ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "mm_kernels_cpu swiglu: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == ref.device(), "mm_kernels_cpu swiglu: ", name, " must be on ", ref.device());
}

// Layout of x [..., 2F at dim, ...] as [outer, 2, n]; also the shape of y.
Layout halves_layout(const at::Tensor& x, int64_t dim, std::vector<int64_t>* out_shape) {
  TORCH_CHECK(x.dim() >= 1, "mm_kernels_cpu swiglu: x must have at least one dimension");
  dim = at::maybe_wrap_dim(dim, x.dim());
  const int64_t split = x.size(dim);
  TORCH_CHECK(split % 2 == 0, "mm_kernels_cpu swiglu: x.size(", dim, ") must be even, got ", split);
  *out_shape = x.sizes().vec();
  (*out_shape)[dim] = split / 2;
  int64_t outer = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  int64_t n = split / 2;
  for (int64_t d = dim + 1; d < x.dim(); ++d) n *= x.size(d);
  return Layout{outer, n, 2 * n};
}

at::Tensor swiglu_fwd(const at::Tensor& x_in, int64_t dim) {
  check_dtype("x", x_in);
  std::vector<int64_t> out_shape;
  const Layout layout = halves_layout(x_in, dim, &out_shape);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = empty_huge_page_advised(out_shape, x.options());
  const bool streaming = use_streaming_stores(y.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::swiglu_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_tile(layout, streaming, [&](int64_t row, int64_t col, int64_t len) {
      const scalar_t* a = xp + row * layout.in_stride + col;
      fwd_tile(a, a + layout.n, yp + row * layout.n + col, len, streaming);
    });
  });
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy_in, const at::Tensor& x_in, int64_t dim) {
  check_dtype("x", x_in);
  std::vector<int64_t> out_shape;
  const Layout layout = halves_layout(x_in, dim, &out_shape);
  check_like("dy", dy_in, "x", x_in, out_shape);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dx = empty_huge_page_advised(x.sizes(), x.options());
  const bool streaming = use_streaming_stores(dx.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(x.scalar_type(), "mm_kernels_cpu::swiglu_bwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    for_each_tile(layout, streaming, [&](int64_t row, int64_t col, int64_t len) {
      const int64_t in = row * layout.in_stride + col;
      bwd_tile(dyp + row * layout.n + col, xp + in, xp + in + layout.n, dxp + in, dxp + in + layout.n, len,
               streaming);
    });
  });
  return dx;
}

at::Tensor swiglu_pair_fwd(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_dtype("gate", gate_in);
  check_like("up", up_in, "gate", gate_in, gate_in.sizes());
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  at::Tensor y = empty_huge_page_advised(gate.sizes(), gate.options());
  const Layout layout{1, gate.numel(), 0};
  const bool streaming = use_streaming_stores(y.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "mm_kernels_cpu::swiglu_pair_fwd", [&] {
    const scalar_t* ap = gate.const_data_ptr<scalar_t>();
    const scalar_t* bp = up.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_tile(layout, streaming, [&](int64_t, int64_t col, int64_t len) {
      fwd_tile(ap + col, bp + col, yp + col, len, streaming);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> swiglu_pair_bwd(const at::Tensor& dy_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in) {
  check_dtype("gate", gate_in);
  check_like("up", up_in, "gate", gate_in, gate_in.sizes());
  check_like("dy", dy_in, "gate", gate_in, gate_in.sizes());
  const at::Tensor gate = gate_in.contiguous();
  const at::Tensor up = up_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor dgate = empty_huge_page_advised(gate.sizes(), gate.options());
  at::Tensor dup = empty_huge_page_advised(gate.sizes(), gate.options());
  const Layout layout{1, gate.numel(), 0};
  const bool streaming = use_streaming_stores(dgate.nbytes());
  MMK_DISPATCH_FLOAT_TYPES(gate.scalar_type(), "mm_kernels_cpu::swiglu_pair_bwd", [&] {
    const scalar_t* ap = gate.const_data_ptr<scalar_t>();
    const scalar_t* bp = up.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dap = dgate.mutable_data_ptr<scalar_t>();
    scalar_t* dbp = dup.mutable_data_ptr<scalar_t>();
    for_each_tile(layout, streaming, [&](int64_t, int64_t col, int64_t len) {
      bwd_tile(dyp + col, ap + col, bp + col, dap + col, dbp + col, len, streaming);
    });
  });
  return {dgate, dup};
}

}  // namespace
}  // namespace mmk

TORCH_LIBRARY_FRAGMENT(mm_kernels_cpu, m) {
  m.def("swiglu_fwd(Tensor x, int dim) -> Tensor");
  m.def("swiglu_bwd(Tensor dy, Tensor x, int dim) -> Tensor");
  m.def("swiglu_pair_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_pair_bwd(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

// Registers the kernels into the library m: the operators of mm_kernels_cpu (defined above) and the
// CPU kernels of the mm_kernels operators (defined by mm_kernels.contract) share names.
namespace {

void register_swiglu_kernels(torch::Library& m) {
  m.impl("swiglu_fwd", &mmk::swiglu_fwd);
  m.impl("swiglu_bwd", &mmk::swiglu_bwd);
  m.impl("swiglu_pair_fwd", &mmk::swiglu_pair_fwd);
  m.impl("swiglu_pair_bwd", &mmk::swiglu_pair_bwd);
}

}  // namespace

TORCH_LIBRARY_IMPL(mm_kernels_cpu, CPU, m) { register_swiglu_kernels(m); }

TORCH_LIBRARY_IMPL(mm_kernels, CPU, m) { register_swiglu_kernels(m); }
