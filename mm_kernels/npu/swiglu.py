"""SwiGLU on Ascend NPUs: torch_npu.npu_swiglu and npu_swiglu_backward, as MindSpeed calls them.

Both take the packed input x (gate and up halves along ``dim``).
The pair form stacks gate and up along a new leading dim first (one extra copy).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import torch_npu
except ImportError as exc:  # only imported when the npu backend was selected
    raise ImportError("mm_kernels.npu.swiglu needs torch_npu (Ascend NPU)") from exc


def swiglu_fwd(x: Tensor, dim: int) -> Tensor:
    """x [..., 2F, ...] -> silu(a) * b [..., F, ...] (halves along ``dim``)."""
    return torch_npu.npu_swiglu(x, dim=dim)


def swiglu_bwd(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """dy [..., F, ...], x [..., 2F, ...] -> dx like x."""
    return torch_npu.npu_swiglu_backward(dy, x, dim=dim)


def swiglu_pair_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [...] -> silu(gate) * up [...]."""
    return torch_npu.npu_swiglu(torch.stack((gate, up)), dim=0).squeeze(0)


def swiglu_pair_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """dy, gate, up [...] -> (dgate, dup)."""
    dx = torch_npu.npu_swiglu_backward(dy.unsqueeze(0), torch.stack((gate, up)), dim=0)
    return dx[0], dx[1]
