#include "cpu_dispatch.h"

namespace mmk {

const char* selected_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA, F16C)";
  return "x86-64 baseline (SSE2)";
#else
  return "generic";
#endif
}

}  // namespace mmk
