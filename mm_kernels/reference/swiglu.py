"""SwiGLU in plain PyTorch (the oracle): silu(a) * b, computed in fp32 (fp64 for fp64 inputs).

``x`` holds a and b as the two halves of dimension ``dim`` (``x.chunk(2, dim)``); the pair
form takes them as two tensors. See ``mm_kernels.ops.swiglu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mm_kernels.precision import compute_dtype


def swiglu_pair_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [...] -> silu(gate) * up [...] in gate.dtype, computed in compute_dtype(gate.dtype)."""
    acc = compute_dtype(gate.dtype)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_pair_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`swiglu_pair_fwd`: (dgate, dup) like gate and up.

    With s = sigmoid(gate): dgate = dy * up * s * (1 + gate * (1 - s)), dup = dy * gate * s.
    """
    acc = compute_dtype(gate.dtype)
    a, b, g = gate.to(acc), up.to(acc), dy.to(acc)
    s = torch.sigmoid(a)
    dgate = g * b * s * (1 + a * (1 - s))
    dup = g * a * s
    return dgate.to(gate.dtype), dup.to(up.dtype)


def swiglu_fwd(x: Tensor, dim: int) -> Tensor:
    """x [..., 2F, ...] (2F at ``dim``) -> silu(first half) * second half [..., F, ...] in x.dtype."""
    gate, up = x.chunk(2, dim)
    return swiglu_pair_fwd(gate, up)


def swiglu_bwd(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """Gradient of :func:`swiglu_fwd`: dy [..., F, ...] -> dx like x, the two halves along ``dim``."""
    gate, up = x.chunk(2, dim)
    return torch.cat(swiglu_pair_bwd(dy, gate, up), dim)
