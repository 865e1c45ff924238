// Row and element loops written with AVX-512 intrinsics, for CPUs with AVX512F/BW/VL/DQ and
// AVX512-BF16 (e.g. AMD Zen 4 and later, Intel Sapphire Rapids and later). Rounding fp32 to bf16 is
// one instruction there (vcvtneps2bf16) instead of a handful of integer operations, and exp goes
// through vscalefps (exact overflow to inf and underflow to 0): these loops run about 1.3 to 1.6x as
// fast as the auto-vectorised ones of swiglu.cpp and rms_norm.cpp, which every other CPU runs.
// Results equal those loops' up to rounding, except that bf16 results below the smallest normal
// (1.2e-38) are flushed to zero. Row sums use the same 32 fixed lanes as rms_norm.cpp.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace mmk::avx512 {

// True when the running CPU has the instruction sets the loops below need (checked once), unless the
// environment sets MM_KERNELS_NO_AVX512=1 (then the portable loops run: for tests and comparisons).
bool supported();

// SwiGLU: y = silu(a) * b over n elements; T is float, c10::BFloat16 or c10::Half. The inputs are
// prefetched ahead; with `streaming` (outputs larger than the caches) full vectors of output are
// written with non-temporal stores straight from the registers (the caller fences them, stream_fence,
// once per task).
template <typename T>
void silu_mul(const T* a, const T* b, T* y, int64_t n, bool streaming);

// SwiGLU backward: da = dy * b * s * (1 + a * (1 - s)), db = dy * a * s with s = sigmoid(a).
template <typename T>
void silu_mul_bwd(const T* dy, const T* a, const T* b, T* da, T* db, int64_t n, bool streaming);

// RMSNorm rows of bf16, the loops of rms_norm.cpp (see there): sum of squares; y = (x * r, rounded
// with round_norm) * scale prefetching `next`; sum of (dy * gscale) * (x * r); dx = r * (g - n * mean_gn)
// with dweight_acc += dy * n (n rounded with round_norm) when dweight_acc is not null.
float sum_squares(const c10::BFloat16* x, int64_t n);
void normalize_row(const c10::BFloat16* x, const float* scale, float r, c10::BFloat16* y, int64_t n,
                   const c10::BFloat16* next, bool round_norm);
float grad_dot(const c10::BFloat16* dy, const c10::BFloat16* x, const float* gscale, float r, int64_t n);
void grad_row(const c10::BFloat16* dy, const c10::BFloat16* x, const float* gscale, float r, float mean_gn,
              c10::BFloat16* dx, float* dweight_acc, int64_t n, const c10::BFloat16* next_dy,
              const c10::BFloat16* next_x, bool round_norm);

}  // namespace mmk::avx512
