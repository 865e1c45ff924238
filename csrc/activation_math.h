// Branch-free fp32 exp and sigmoid that the compiler vectorises (no libm calls, no lookup
// tables), for the activation kernels. NaN stays NaN.
#pragma once

#include <cstdint>
#include <limits>

#include "dtype_convert.h"

namespace mmk {

// exp(x) within 2 ulp of expf for x in [-87, 88]; below -87 (and -inf) it is 0, above 88.72 (and
// +inf) it is +inf, in between it is exp(88) (so that 2^n stays a normal float).
inline float exp_f32(float x) {
  constexpr float kMin = -87.0f;
  constexpr float kMax = 88.0f;
  constexpr float kOverflow = 88.72f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
  constexpr float kRoundMagic = 12582912.0f;
  const bool underflows = x < kMin;
  const bool overflows = x > kOverflow;
  // Comparisons, not fminf/fmaxf: NaN must pass through.
  x = x < kMin ? kMin : x;
  x = x > kMax ? kMax : x;
  const float shifted = x * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  // n + 127 in the exponent field is 2^n (unsigned arithmetic: no overflow even for NaN).
  const uint32_t scale_bits = (float_to_bits(shifted) - float_to_bits(kRoundMagic) + 127u) << 23;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  // Minimax polynomial for exp(r) on |r| <= ln(2)/2 (Cephes expf coefficients).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float e = p * bits_to_float(scale_bits);
  return underflows ? 0.0f : overflows ? std::numeric_limits<float>::infinity() : e;
}

// 1 / (1 + exp(-x)), as torch computes it: sigmoid(-inf) = 0, so silu(-inf) = -inf * 0 is NaN.
inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

}  // namespace mmk
