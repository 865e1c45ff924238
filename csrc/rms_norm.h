// RMSNorm CPU kernels (csrc/rms_norm.cpp), registered as mm_kernels_cpu::rms_norm_fwd,
// rms_norm_bwd and add_rms_norm_fwd. Semantics and argument order are those of
// mm_kernels/reference/rms_norm.py; x is fp32, bf16 or fp16 (any shape [..., H], H >= 1).
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mmk {

// x [..., H], weight [H] | None -> (y [..., H] in x.dtype, rstd [...] fp32).
// casting: "llama" | "gemma" | "none"; the weight is used as (offset + weight).
std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                double eps, std::string_view casting, double offset);

// Gradients of rms_norm_fwd: (dx like x, dweight like weight; an empty tensor without weight).
// dweight is reduced in fp32 over fixed row blocks, so its bits do not depend on the thread count.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                                double eps, std::string_view casting, double offset);

// (x + residual) then llama RMSNorm: -> (y, rstd fp32, x + residual in x.dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                const std::optional<at::Tensor>& weight,
                                                                double eps);

}  // namespace mmk
