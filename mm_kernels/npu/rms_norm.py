"""RMSNorm on Ascend NPUs through torch_npu, same functions as ``mm_kernels.reference.rms_norm``.

``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`` computes x * rstd * gamma in fp32 and
rounds once. That is the gemma casting with offset 0 exactly; the llama casting (MindSpeed's fused
norm) rounds the normalised x to x's dtype before the weight multiply, so there the kernel's result
can differ from the reference by one unit in the last place. Both run the kernel when the weight has
x's dtype and there is no offset; its backward is
``torch.ops.npu.npu_rms_norm_backward(dy, x, gamma, rstd) -> (dx, dgamma)``. Every other
combination (no weight, none casting, an offset, a weight of another dtype) runs the reference
functions on the NPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels.reference import rms_norm as reference

try:
    import torch_npu
except ImportError:
    torch_npu = None

def _fused(x: Tensor, weight: Tensor | None, casting: str, offset: float) -> bool:
    return (torch_npu is not None and x.device.type == "npu" and weight is not None
            and casting in ("llama", "gemma") and offset == 0.0 and weight.dtype == x.dtype)


def _fused_backward_available() -> bool:
    return hasattr(torch.ops, "npu") and hasattr(torch.ops.npu, "npu_rms_norm_backward")


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor]:
    """x [..., H], weight [H] or None -> (y [..., H] in x.dtype, rstd [...] fp32)."""
    if not _fused(x, weight, casting, offset):
        return reference.rms_norm_fwd(x, weight, eps, casting, offset)
    y, rstd = torch_npu.npu_rms_norm(x, weight, epsilon=eps)
    return y, rstd.reshape(x.shape[:-1]).float()


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients (dx like x, dweight like weight or None)."""
    if not (_fused(x, weight, casting, offset) and _fused_backward_available()):
        return reference.rms_norm_bwd(dy, x, weight, rstd, eps, casting, offset)
    dx, dweight = torch.ops.npu.npu_rms_norm_backward(dy, x, weight, rstd.unsqueeze(-1))
    return dx, dweight.to(weight.dtype)


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual [..., H] -> (y, rstd [...] fp32, x + residual): llama RMSNorm of the residual sum."""
    if not (_fused(x, weight, "llama", 0.0) and hasattr(torch_npu, "npu_add_rms_norm")):
        summed = x + residual
        y, rstd = rms_norm_fwd(summed, weight, eps, "llama", 0.0)
        return y, rstd, summed
    y, rstd, summed = torch_npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, rstd.reshape(x.shape[:-1]).float(), summed
