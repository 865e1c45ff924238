// Runtime CPU dispatch for hot loops.
//
// A function marked MMK_VECTORIZED is compiled once per instruction-set level and the
// dynamic loader picks the best one for the running CPU (GCC/Clang target_clones +
// ifunc). Write such a function as a plain loop over contiguous memory: at -O3 the
// compiler vectorises each clone with its own vector width. Keep OpenMP/at::parallel_for
// outside the marked function (the outlined parallel body would not be cloned).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MMK_NO_CLONES)
#define MMK_VECTORIZED \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMK_VECTORIZED
#endif

namespace mmk {

// Names of the instruction-set levels the running CPU gets from MMK_VECTORIZED.
const char* selected_isa();

}  // namespace mmk
