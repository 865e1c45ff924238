"""RMSNorm: public API and the ``mm_kernels::rms_norm_*`` operators (see :mod:`mm_kernels.ops._kernel_op`).

Casting modes (statistics always in fp32):
- ``llama``: normalise in fp32, cast to x.dtype, multiply by (offset + weight) (HF, Megatron, MindSpeed).
- ``gemma``: everything in fp32, weight used as (offset + weight), result cast to x.dtype.
- ``none``: normalise and scale in x.dtype with the fp32 rstd cast to x.dtype.
"""

from typing import Optional

import torch
from torch import Tensor

from mm_kernels import contract
from mm_kernels.ops._checks import check_float, check_min_dim, check_same_device
from mm_kernels.ops._kernel_op import KernelOp
from mm_kernels.precision import compute_dtype

CASTING_MODES = ("llama", "gemma", "none")

rms_norm_fwd = KernelOp(contract.RMSNorm, "rms_norm_fwd")
rms_norm_bwd = KernelOp(contract.RMSNorm, "rms_norm_bwd")
add_rms_norm_fwd = KernelOp(contract.RMSNorm, "add_rms_norm_fwd")


def _rstd_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))


@rms_norm_fwd.register_fake
def _(x, weight, eps, casting, offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _rstd_like(x)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, eps, casting, offset):
    dweight = x.new_empty(0) if weight is None else torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight


def _setup_context(ctx, inputs, output):
    x, weight, eps, casting, offset = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.eps, ctx.casting, ctx.offset = eps, casting, offset


def _backward(ctx, dy, drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_bwd.run(ctx.backend, dy.contiguous(), x, weight, rstd, ctx.eps, ctx.casting, ctx.offset)
    return dx, (dweight if weight is not None else None), None, None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps):
    dense = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dense, _rstd_like(x), torch.empty_like(dense)


def _add_setup_context(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[2], weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.eps = eps


def _add_backward(ctx, dy, drstd, dsum):
    summed, weight, rstd = ctx.saved_tensors
    dnorm, dweight = rms_norm_bwd.run(ctx.backend, dy.contiguous(), summed, weight, rstd, ctx.eps, "llama", 0.0)
    dx = dnorm if dsum is None else dnorm + dsum
    return dx, dx, (dweight if weight is not None else None), None


add_rms_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup_context)


def _check_args(x: object, weight: object, eps: float, casting: str) -> None:
    check_float("x", x)
    check_min_dim("x", x, 1, "[..., H]")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have shape [..., H] with H >= 1, got {tuple(x.shape)}")
    if weight is not None:
        check_float("weight", weight)
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"weight must have shape [H] = [{x.shape[-1]}] (the last dim of x), got {tuple(weight.shape)}")
        check_same_device(x=x, weight=weight)
    if casting not in CASTING_MODES:
        raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def rms_norm_with_rstd(
    x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, casting: str = "llama", offset: float = 0.0
) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dim, also returning the reciprocal RMS.

    x [..., H] fp32/fp16/bf16, weight [H] or None -> (y [..., H] in x.dtype, rstd [...] fp32 (fp64 for fp64 x)),
    y = x * rstd * (offset + weight) with rstd = 1 / sqrt(mean(x^2) + eps).
    """
    _check_args(x, weight, eps, casting)
    return rms_norm_fwd(x, weight, float(eps), casting, float(offset))


def rms_norm(
    x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, casting: str = "llama", offset: float = 0.0
) -> Tensor:
    """RMSNorm over the last dim: x [..., H], weight [H] or None -> y [..., H] in x.dtype."""
    return rms_norm_with_rstd(x, weight, eps, casting, offset)[0]


def add_rms_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused residual add + llama RMSNorm.

    x, residual [..., H] (same shape and dtype), weight [H] or None ->
    (y = rms_norm(x + residual), rstd [...] fp32 (fp64 for fp64 x), x + residual in x.dtype).
    """
    _check_args(x, weight, eps, "llama")
    check_float("residual", residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual must match x: shape {tuple(x.shape)} dtype {x.dtype}, got {tuple(residual.shape)} {residual.dtype}"
        )
    check_same_device(x=x, residual=residual)
    return add_rms_norm_fwd(x, residual, weight, float(eps))
