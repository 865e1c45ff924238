"""RMSNorm on the C++ CPU kernels (``torch.ops.mm_kernels_cpu``), same functions as ``mm_kernels.reference.rms_norm``.

The kernels take fp32, bf16 and fp16; fp64 inputs (statistics in fp64) run the reference functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels._extension import cpu_extension
from mm_kernels.reference import rms_norm as reference


def _ops():
    cpu_extension()
    return torch.ops.mm_kernels_cpu


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor]:
    """x [..., H], weight [H] or None -> (y [..., H] in x.dtype, rstd [...] fp32; fp64 for fp64 x)."""
    if x.dtype == torch.float64:
        return reference.rms_norm_fwd(x, weight, eps, casting, offset)
    return _ops().rms_norm_fwd(x, weight, eps, casting, offset)


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients (dx like x, dweight like weight or None); dweight summed in fp32 in a fixed order."""
    if x.dtype == torch.float64:
        return reference.rms_norm_bwd(dy, x, weight, rstd, eps, casting, offset)
    dx, dweight = _ops().rms_norm_bwd(dy, x, weight, rstd, eps, casting, offset)
    return dx, (None if weight is None else dweight)


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual [..., H] -> (y, rstd [...] fp32, x + residual): llama RMSNorm of the residual sum."""
    if x.dtype == torch.float64:
        return reference.add_rms_norm_fwd(x, residual, weight, eps)
    return _ops().add_rms_norm_fwd(x, residual, weight, eps)
