"""SwiGLU benchmark: ``swiglu(x)`` with x [T, 2F] -> [T, F], and ``swiglu_pair(gate, up)``; fwd, bwd and fwd+bwd.

The eager baseline is ``silu(a) * b``. The packed form hands Liger-Kernel the two halves of x (views,
which it copies to contiguous tensors); the pair form gives every implementation two tensors. The
one-row shape measures the per-call overhead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mm_kernels.bench import liger
from mm_kernels.bench.harness import BenchCase, timings
from mm_kernels.ops.swiglu import swiglu, swiglu_pair

KERNEL = "swiglu"

# (tokens, 2F): an [8192, 8192] -> [8192, 4096] activation, a Llama-7B MLP (F = 11008) on 4096 tokens, one row.
SHAPES = [(8192, 8192), (4096, 2 * 11008), (1, 8192)]
PAIR_SHAPES = [(8192, 4096)]
QUICK_SHAPES = [(64, 256), (33, 246)]


def _eager(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


def _ours(x: torch.Tensor) -> torch.Tensor:
    return swiglu(x, dim=-1)


def _eager_pair(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _liger_halves(device: torch.device):
    silu_mul = liger.silu_mul(device)
    return None if silu_mul is None else (lambda x: silu_mul(*x.chunk(2, dim=-1)))


def _make(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device):
    def make():
        return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for shape in shapes)

    return make


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> list[BenchCase]:
    """fwd, bwd and fwd+bwd of the packed form per shape and dtype, then of the pair form.

    Bytes moved (h = one [T, F] tensor): fwd reads x (2h), writes y (h); bwd reads dy (h) and x (2h),
    writes dx (2h); fwd+bwd both.
    """
    traffic = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
    result = []
    for dtype in dtypes:
        for tokens, width in QUICK_SHAPES if quick else SHAPES:
            half = tokens * width // 2 * dtype.itemsize
            for timing in timings(device):
                result.append(BenchCase(KERNEL, timing, f"[{tokens}, {width}] -> [{tokens}, {width // 2}]", dtype,
                                        _make([(tokens, width)], dtype, device), _ours, _eager,
                                        liger=_liger_halves(device), bytes_moved=traffic[timing] * half, grad_of=(0,)))
        for tokens, ffn in [] if quick else PAIR_SHAPES:
            half = tokens * ffn * dtype.itemsize
            for timing in timings(device):
                result.append(BenchCase(KERNEL, timing, f"pair 2 x [{tokens}, {ffn}]", dtype,
                                        _make([(tokens, ffn)] * 2, dtype, device), swiglu_pair, _eager_pair,
                                        liger=liger.silu_mul(device), bytes_moved=traffic[timing] * half, grad_of=(0, 1)))
    return result
