"""Liger-Kernel's RMSNorm and SwiGLU as forward functions: CUDA baselines when liger_kernel is installed.

Liger-Kernel is optional; each function returns None without it (or off CUDA, where it has no kernels).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable

import torch


def _installed(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def rms_norm(device: torch.device, eps: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """x [..., H], weight [H] -> llama-casting RMSNorm by Liger-Kernel (out of place), or None."""
    if not _installed(device):
        return None
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # Newer versions take (X, W, eps, offset, casting_mode, in_place, ...); older ones (X, W, eps, offset).
    params = list(inspect.signature(LigerRMSNormFunction.forward).parameters)[4:]
    extra = {"offset": 0.0, "casting_mode": "llama", "in_place": False}
    args = [extra[name] for name in params[:params.index("in_place") + 1]] if "in_place" in params else []

    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return LigerRMSNormFunction.apply(x, weight, eps, *args)

    return forward


def silu_mul(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """gate, up [...] -> silu(gate) * up by Liger-Kernel, or None."""
    if not _installed(device):
        return None
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply
