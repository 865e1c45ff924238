#include "avx512_bf16.h"

// GCC 12 reports the _mm512_undefined_ps() inside its own intrinsic headers as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cstdlib>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MMK_AVX512_LOOPS 1
#define MMK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))
#define MMK_AVX512_INLINE MMK_AVX512 inline __attribute__((always_inline))
#endif

namespace mmk::avx512 {

#if MMK_AVX512_LOOPS

bool supported() {
  static const bool supported = [] {
    const char* off = std::getenv("MM_KERNELS_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

namespace {

// 16 elements as fp32: all of them (kFull), or the lanes of m (the others 0). Masked memory accesses
// are slow on some CPUs (AMD): only the tail of a loop uses them.
constexpr __mmask16 kFull = 0xffff;

MMK_AVX512_INLINE __m256i load16_bits(const void* p, __mmask16 m) {
  return m == kFull ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
}
MMK_AVX512_INLINE __m512 load(const float* p, __mmask16 m) {
  return m == kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
MMK_AVX512_INLINE __m512 load(const c10::BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load16_bits(p, m)), 16));
}
MMK_AVX512_INLINE __m512 load(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(load16_bits(p, m)); }

// Stores the lanes of m, rounded to nearest even.
MMK_AVX512_INLINE void store16_bits(void* p, __m256i v, __mmask16 m) {
  if (m == kFull) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  } else {
    _mm256_mask_storeu_epi16(p, m, v);
  }
}
MMK_AVX512_INLINE void store(float* p, __m512 v, __mmask16 m) {
  if (m == kFull) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}
MMK_AVX512_INLINE void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  store16_bits(p, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)), m);
}
MMK_AVX512_INLINE void store(c10::Half* p, __m512 v, __mmask16 m) {
  store16_bits(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m);
}

// A full vector written with a non-temporal store where the destination is aligned for one (the
// line is not read first), else stored normally.
MMK_AVX512_INLINE void stream(float* p, __m512 v) {
  if (reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, v);
  _mm512_storeu_ps(p, v);
}
MMK_AVX512_INLINE void stream16_bits(void* p, __m256i v) {
  if (reinterpret_cast<uintptr_t>(p) % 32 == 0) return _mm256_stream_si256(static_cast<__m256i*>(p), v);
  _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
MMK_AVX512_INLINE void stream(c10::BFloat16* p, __m512 v) {
  stream16_bits(p, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
MMK_AVX512_INLINE void stream(c10::Half* p, __m512 v) {
  stream16_bits(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// Stores 16 outputs: the lanes of m, or with kStreaming a full vector through a non-temporal store.
template <bool kStreaming, typename T>
MMK_AVX512_INLINE void put(T* p, __m512 v, __mmask16 m) {
  if constexpr (kStreaming) {
    if (m == kFull) return stream(p, v);
  }
  store(p, v, m);
}

// Elements the SwiGLU loops prefetch ahead in each input: reads stay in flight during the arithmetic.
constexpr int64_t kPrefetchElems = 1024;

// exp(t) within 2 ulp (Cephes expf polynomial); 0 below -104, inf above 88.72, NaN stays NaN.
MMK_AVX512_INLINE __m512 exp(__m512 t) {
  // max/min return their second operand when one is NaN: NaN passes through.
  t = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), t));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n, overflowing to inf and underflowing to 0 exactly
}

// 1 / (1 + exp(-x)).
MMK_AVX512_INLINE __m512 sigmoid(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// The first `left` (< 16) lanes.
MMK_AVX512_INLINE __mmask16 tail_mask(int64_t left) { return __mmask16((1u << left) - 1u); }

template <bool kStreaming, typename T>
MMK_AVX512_INLINE void silu_mul16(const T* a, const T* b, T* y, __mmask16 m) {
  const __m512 x = load(a, m);
  put<kStreaming>(y, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid(x)), load(b, m)), m);
}

template <bool kStreaming, typename T>
MMK_AVX512_INLINE void silu_mul_bwd16(const T* dy, const T* a, const T* b, T* da, T* db, __mmask16 m) {
  const __m512 x = load(a, m);
  const __m512 g = load(dy, m);
  const __m512 s = sigmoid(x);
  const __m512 silu = _mm512_mul_ps(x, s);
  const __m512 dsilu = _mm512_fmadd_ps(silu, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), s);  // s + silu * (1 - s)
  put<kStreaming>(da, _mm512_mul_ps(_mm512_mul_ps(g, load(b, m)), dsilu), m);
  put<kStreaming>(db, _mm512_mul_ps(g, silu), m);
}

MMK_AVX512_INLINE void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

template <bool kStreaming, typename T>
MMK_AVX512 void silu_mul_loop(const T* a, const T* b, T* y, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch(a + i + kPrefetchElems);
    prefetch(b + i + kPrefetchElems);
    silu_mul16<kStreaming>(a + i, b + i, y + i, kFull);
    silu_mul16<kStreaming>(a + i + 16, b + i + 16, y + i + 16, kFull);
  }
  for (; i < n; i += 16) silu_mul16<kStreaming>(a + i, b + i, y + i, n - i >= 16 ? kFull : tail_mask(n - i));
}

template <bool kStreaming, typename T>
MMK_AVX512 void silu_mul_bwd_loop(const T* dy, const T* a, const T* b, T* da, T* db, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    prefetch(dy + i + kPrefetchElems);
    prefetch(a + i + kPrefetchElems);
    prefetch(b + i + kPrefetchElems);
    silu_mul_bwd16<kStreaming>(dy + i, a + i, b + i, da + i, db + i, kFull);
    silu_mul_bwd16<kStreaming>(dy + i + 16, a + i + 16, b + i + 16, da + i + 16, db + i + 16, kFull);
  }
  for (; i < n; i += 16) {
    silu_mul_bwd16<kStreaming>(dy + i, a + i, b + i, da + i, db + i, n - i >= 16 ? kFull : tail_mask(n - i));
  }
}

// x rounded to bf16 and back.
MMK_AVX512_INLINE __m512 round_bf16(__m512 x) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x))), 16));
}

// The 32 lanes of two accumulators summed in lane order (as rms_norm.cpp's sum_lanes).
MMK_AVX512_INLINE float sum_lanes(__m512 low, __m512 high) {
  alignas(64) float lanes[32];
  _mm512_store_ps(lanes, low);
  _mm512_store_ps(lanes + 16, high);
  float total = 0.f;
  for (float lane : lanes) total += lane;
  return total;
}

// Element j of a row goes to lane j % 32: two accumulators of 16 lanes, the tail masked.
template <typename Term>
MMK_AVX512_INLINE float lane_sum(int64_t n, const Term& term) {
  __m512 low = _mm512_setzero_ps();
  __m512 high = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    low = term(i, kFull, low);
    high = term(i + 16, kFull, high);
  }
  if (i < n) low = term(i, n - i >= 16 ? kFull : tail_mask(n - i), low);
  if (i + 16 < n) high = term(i + 16, tail_mask(n - i - 16), high);
  return sum_lanes(low, high);
}

}  // namespace

MMK_AVX512 float sum_squares(const c10::BFloat16* x, int64_t n) {
  return lane_sum(n, [&](int64_t i, __mmask16 m, __m512 acc) MMK_AVX512 {
    const __m512 v = load(x + i, m);
    return _mm512_fmadd_ps(v, v, acc);
  });
}

MMK_AVX512 float grad_dot(const c10::BFloat16* dy, const c10::BFloat16* x, const float* gscale, float r, int64_t n) {
  const __m512 rv = _mm512_set1_ps(r);
  return lane_sum(n, [&](int64_t i, __mmask16 m, __m512 acc) MMK_AVX512 {
    const __m512 g = _mm512_mul_ps(load(dy + i, m), load(gscale + i, m));
    return _mm512_fmadd_ps(g, _mm512_mul_ps(load(x + i, m), rv), acc);
  });
}

MMK_AVX512 void normalize_row(const c10::BFloat16* x, const float* scale, float r, c10::BFloat16* y, int64_t n,
                              const c10::BFloat16* next, bool round_norm) {
  const __m512 rv = _mm512_set1_ps(r);
  const auto one = [&](int64_t i, __mmask16 m) MMK_AVX512 {
    __m512 v = _mm512_mul_ps(load(x + i, m), rv);
    if (round_norm) v = round_bf16(v);
    store(y + i, _mm512_mul_ps(v, load(scale + i, m)), m);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
    one(i, kFull);
    one(i + 16, kFull);
  }
  for (; i < n; i += 16) one(i, n - i >= 16 ? kFull : tail_mask(n - i));
}

MMK_AVX512 void grad_row(const c10::BFloat16* dy, const c10::BFloat16* x, const float* gscale, float r,
                         float mean_gn, c10::BFloat16* dx, float* dweight_acc, int64_t n,
                         const c10::BFloat16* next_dy, const c10::BFloat16* next_x, bool round_norm) {
  const __m512 rv = _mm512_set1_ps(r);
  const __m512 mean = _mm512_set1_ps(mean_gn);
  const auto one = [&](int64_t i, __mmask16 m) MMK_AVX512 {
    const __m512 g = load(dy + i, m);
    const __m512 norm = _mm512_mul_ps(load(x + i, m), rv);
    const __m512 d = _mm512_fnmadd_ps(norm, mean, _mm512_mul_ps(g, load(gscale + i, m)));
    store(dx + i, _mm512_mul_ps(rv, d), m);
    if (dweight_acc != nullptr) {
      const __m512 used = round_norm ? round_bf16(norm) : norm;
      store(dweight_acc + i, _mm512_fmadd_ps(g, used, load(dweight_acc + i, m)), m);
    }
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(next_dy + i), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next_x + i), _MM_HINT_T0);
    one(i, kFull);
    one(i + 16, kFull);
  }
  for (; i < n; i += 16) one(i, n - i >= 16 ? kFull : tail_mask(n - i));
}

template <typename T>
void silu_mul(const T* a, const T* b, T* y, int64_t n, bool streaming) {
  if (streaming) return silu_mul_loop<true>(a, b, y, n);
  silu_mul_loop<false>(a, b, y, n);
}

template <typename T>
void silu_mul_bwd(const T* dy, const T* a, const T* b, T* da, T* db, int64_t n, bool streaming) {
  if (streaming) return silu_mul_bwd_loop<true>(dy, a, b, da, db, n);
  silu_mul_bwd_loop<false>(dy, a, b, da, db, n);
}

#else

bool supported() { return false; }

template <typename T>
void silu_mul(const T*, const T*, T*, int64_t, bool) {}

template <typename T>
void silu_mul_bwd(const T*, const T*, const T*, T*, T*, int64_t, bool) {}

float sum_squares(const c10::BFloat16*, int64_t) { return 0.f; }
void normalize_row(const c10::BFloat16*, const float*, float, c10::BFloat16*, int64_t, const c10::BFloat16*, bool) {}
float grad_dot(const c10::BFloat16*, const c10::BFloat16*, const float*, float, int64_t) { return 0.f; }
void grad_row(const c10::BFloat16*, const c10::BFloat16*, const float*, float, float, c10::BFloat16*, float*, int64_t,
              const c10::BFloat16*, const c10::BFloat16*, bool) {}

#endif

template void silu_mul(const float*, const float*, float*, int64_t, bool);
template void silu_mul(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t, bool);
template void silu_mul(const c10::Half*, const c10::Half*, c10::Half*, int64_t, bool);
template void silu_mul_bwd(const float*, const float*, const float*, float*, float*, int64_t, bool);
template void silu_mul_bwd(const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*,
                           c10::BFloat16*, int64_t, bool);
template void silu_mul_bwd(const c10::Half*, const c10::Half*, const c10::Half*, c10::Half*, c10::Half*, int64_t, bool);

}  // namespace mmk::avx512
