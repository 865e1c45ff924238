"""RMSNorm in plain PyTorch (the oracle). Statistics in fp32 (fp64 for fp64 inputs); see ``mm_kernels.ops.rms_norm``."""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor]:
    """x [..., H], weight [H] or None -> (y [..., H] in x.dtype, rstd [...] in compute_dtype(x.dtype))."""
    xf = x.to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
    scale = None if weight is None else weight + offset
    if casting == "gemma":
        y = xf * rstd.unsqueeze(-1)
        if weight is not None:
            y = y * (weight.to(xf.dtype) + offset)
    elif casting == "llama":
        y = (xf * rstd.unsqueeze(-1)).to(x.dtype)
        if scale is not None:
            y = y * scale.to(x.dtype)
    else:
        y = x * rstd.unsqueeze(-1).to(x.dtype)
        if scale is not None:
            y = y * scale.to(x.dtype)
    return y.to(x.dtype), rstd


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients (dx like x, dweight like weight or None), computed in ``compute_dtype(x.dtype)``.

    With n = x * rstd and g = dy * (offset + weight): dx = rstd * (g - n * mean(g * n)),
    dweight = sum over rows of dy * n (n rounded to x.dtype first for ``llama``).
    """
    del eps
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    dyf = dy.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    n = xf * r
    g = dyf if weight is None else dyf * (weight.to(acc) + offset)
    dx = r * (g - n * (g * n).mean(dim=-1, keepdim=True))
    dweight = None
    if weight is not None:
        n_used = n.to(x.dtype).to(acc) if casting == "llama" else n
        dweight = (dyf * n_used).reshape(-1, x.shape[-1]).sum(dim=0).to(weight.dtype)
    return dx.to(x.dtype), dweight


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, rstd fp32, x + residual): llama RMSNorm of the residual sum."""
    summed = x + residual
    y, rstd = rms_norm_fwd(summed, weight, eps, "llama", 0.0)
    return y, rstd, summed
