"""FusedRMSNorm: ``torch.nn.RMSNorm`` computed by :func:`mm_kernels.rms_norm`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mm_kernels.ops.rms_norm import CASTING_MODES, rms_norm


class FusedRMSNorm(torch.nn.RMSNorm):
    """Drop-in ``torch.nn.RMSNorm`` (same constructor, parameters and state dict) on the fused kernel.

    ``casting`` ("llama", "gemma", "none") and ``offset`` (the weight is used as offset + weight,
    1.0 for Gemma checkpoints) select the variant; see :mod:`mm_kernels.ops.rms_norm`. A
    multi-dimensional ``normalized_shape`` normalises over the trailing dims flattened into one.
    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True,
                 device=None, dtype=None, casting: str = "llama", offset: float = 0.0) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        if casting not in CASTING_MODES:
            raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
        self.casting = casting
        self.offset = float(offset)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., *normalized_shape] -> same shape and dtype."""
        dims = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - dims:]) != tuple(self.normalized_shape):
            raise ValueError(f"x must have shape [..., {', '.join(map(str, self.normalized_shape))}], "
                             f"got {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        weight = self.weight
        if dims > 1:
            x = x.reshape(*x.shape[: x.dim() - dims], math.prod(self.normalized_shape))
            weight = None if weight is None else weight.reshape(-1)
        y = rms_norm(x, weight, eps, self.casting, self.offset)
        return y.reshape(*y.shape[:-1], *self.normalized_shape) if dims > 1 else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, casting={self.casting!r}, offset={self.offset}"
