"""SwiGLU on CPU: the C++ operators ``torch.ops.mm_kernels_cpu.swiglu_*`` (csrc/swiglu.cpp).

The C++ kernels take fp32, bf16 and fp16; fp64 tensors run the reference (fp64 throughout).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels._extension import cpu_extension
from mm_kernels.reference import swiglu as reference

cpu_extension()


def swiglu_fwd(x: Tensor, dim: int) -> Tensor:
    """x [..., 2F, ...] -> silu(a) * b [..., F, ...] (halves along ``dim``)."""
    if x.dtype == torch.float64:
        return reference.swiglu_fwd(x, dim)
    return torch.ops.mm_kernels_cpu.swiglu_fwd(x, dim)


def swiglu_bwd(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """dy [..., F, ...], x [..., 2F, ...] -> dx like x."""
    if x.dtype == torch.float64:
        return reference.swiglu_bwd(dy, x, dim)
    return torch.ops.mm_kernels_cpu.swiglu_bwd(dy, x, dim)


def swiglu_pair_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [...] -> silu(gate) * up [...]."""
    if gate.dtype == torch.float64:
        return reference.swiglu_pair_fwd(gate, up)
    return torch.ops.mm_kernels_cpu.swiglu_pair_fwd(gate, up)


def swiglu_pair_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """dy, gate, up [...] -> (dgate, dup)."""
    if gate.dtype == torch.float64:
        return reference.swiglu_pair_bwd(dy, gate, up)
    return torch.ops.mm_kernels_cpu.swiglu_pair_bwd(dy, gate, up)
