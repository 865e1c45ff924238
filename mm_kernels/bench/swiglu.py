"""SwiGLU benchmark: ``swiglu(x)`` with x [T, 2F] -> [T, F], forward and forward+backward."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mm_kernels.bench.harness import BenchCase
from mm_kernels.ops.swiglu import swiglu
from mm_kernels.reference.swiglu import swiglu_fwd as reference_swiglu

KERNEL = "swiglu"

# (tokens, 2F): an [8192, 8192] -> [8192, 4096] activation, and a Llama-7B MLP (F = 11008) on 4096 tokens.
SHAPES = [(8192, 8192), (4096, 2 * 11008)]
QUICK_SHAPES = [(64, 256), (33, 246)]


def _ours_fwd(x: torch.Tensor) -> torch.Tensor:
    return swiglu(x, dim=-1)


def _reference_fwd(x: torch.Tensor) -> torch.Tensor:
    return reference_swiglu(x, -1)


def _ours_fwd_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(swiglu(x, dim=-1), x, dy)[0]


def _reference_fwd_bwd(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(reference_swiglu(x, -1), x, dy)[0]


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> list[BenchCase]:
    """Forward and forward+backward cases for each shape and dtype."""
    result = []
    for tokens, width in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            size = torch.tensor([], dtype=dtype).element_size()
            half = tokens * width // 2 * size
            shape = f"[{tokens}, {width}] -> [{tokens}, {width // 2}]"

            def make_fwd(tokens=tokens, width=width, dtype=dtype):
                return (torch.randn(tokens, width, device=device, dtype=dtype),)

            def make_fwd_bwd(tokens=tokens, width=width, dtype=dtype):
                x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
                return x, torch.randn(tokens, width // 2, device=device, dtype=dtype)

            # Least traffic: forward reads x (2 halves) and writes y; backward reads dy and x, writes dx.
            result.append(BenchCase(KERNEL, "fwd", shape, dtype, make_fwd, _ours_fwd, _reference_fwd,
                                    bytes_moved=3 * half))
            result.append(BenchCase(KERNEL, "fwd+bwd", shape, dtype, make_fwd_bwd, _ours_fwd_bwd,
                                    _reference_fwd_bwd, bytes_moved=8 * half))
    return result
