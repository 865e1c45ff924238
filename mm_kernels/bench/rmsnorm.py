"""RMSNorm benchmark cases: llama casting with a weight, forward, backward and forward+backward.

The eager baseline is ``torch.nn.functional.rms_norm``; the last shape, one row, measures the
per-call overhead (a decode step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mm_kernels
from mm_kernels.bench import liger
from mm_kernels.bench.harness import BenchCase, timings

KERNEL = "rmsnorm"
EPS = 1e-6
SHAPES = [(8192, 4096), (16384, 1024), (1, 4096)]
QUICK_SHAPES = [(64, 256), (1, 128)]


def _eager(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, x.shape[-1:], weight, EPS)


def _ours(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return mm_kernels.rms_norm(x, weight, EPS)


def _inputs(rows: int, hidden: int, dtype: torch.dtype, device: torch.device):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(rows, hidden, generator=gen, dtype=torch.float32).to(device, dtype)
        weight = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
        return x.requires_grad_(), weight.requires_grad_()

    return make


def cases(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> list[BenchCase]:
    """fwd, bwd and fwd+bwd of llama RMSNorm [rows, H] per shape and dtype.

    Bytes moved: fwd reads x, writes y; bwd reads dy and x, writes dx; fwd+bwd both (the weight and
    its gradient are negligible beside them).
    """
    found = []
    for rows, hidden in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            size = dtype.itemsize
            tensor = rows * hidden * size
            traffic = {"fwd": 2 * tensor + hidden * size, "bwd": 3 * tensor + 2 * hidden * size,
                       "fwd+bwd": 5 * tensor + 3 * hidden * size}
            for timing in timings(device):
                found.append(BenchCase(
                    kernel=KERNEL, timing=timing, shape=f"[{rows}, {hidden}]", dtype=dtype,
                    make_inputs=_inputs(rows, hidden, dtype, device), ours=_ours, eager=_eager,
                    liger=liger.rms_norm(device, EPS), bytes_moved=traffic[timing], grad_of=(0, 1),
                ))
    return found
