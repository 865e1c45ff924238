// The one dtype dispatch of the CPU kernels: fp32, bf16 and fp16 (the dtypes of
// mm_kernels.precision.KERNEL_DTYPES; others never reach a kernel).
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda __VA_ARGS__ with scalar_t the C++ type of TYPE (float, c10::BFloat16, c10::Half);
// any other dtype raises a c10::Error naming NAME.
#define MMK_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
