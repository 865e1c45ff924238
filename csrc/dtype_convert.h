// Branch-free conversions between fp32 and the 16-bit float formats, written so that the
// compiler vectorises loops using them (bit operations only, no lookup, no calls).
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace mmk {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// Loads one element as fp32.
inline float load_f32(float v) { return v; }
inline float load_f32(double v) { return static_cast<float>(v); }
inline float load_f32(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
inline float load_f32(c10::Half v) { return static_cast<float>(v); }

// Stores an fp32 value as T, rounding to nearest even (NaN stays NaN).
template <typename T>
inline T store_as(float v);

template <>
inline float store_as<float>(float v) { return v; }

template <>
inline double store_as<double>(float v) { return v; }

template <>
inline c10::BFloat16 store_as<c10::BFloat16>(float v) {
  const uint32_t bits = float_to_bits(v);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return c10::BFloat16(static_cast<uint16_t>(is_nan ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

template <>
inline c10::Half store_as<c10::Half>(float v) { return c10::Half(v); }

}  // namespace mmk
