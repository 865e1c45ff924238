"""RMSNorm benchmark cases: llama casting with a weight, forward and forward+backward."""

from __future__ import annotations

import torch

import mm_kernels
from mm_kernels.bench.harness import BenchCase
from mm_kernels.reference import rms_norm as reference

KERNEL = "rmsnorm"
EPS = 1e-6
SHAPES = [(8192, 4096), (16384, 1024)]
QUICK_SHAPES = [(64, 256)]


def _reference_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return reference.rms_norm_fwd(x, weight, EPS, "llama", 0.0)[0]


def _ours_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return mm_kernels.rms_norm(x, weight, EPS)


def _with_backward(forward):
    def forward_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor):
        return torch.autograd.grad(forward(x, weight), (x, weight), dy)

    return forward_backward


def _inputs(rows: int, hidden: int, dtype: torch.dtype, device: torch.device, grad: bool):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(rows, hidden, generator=gen, dtype=torch.float32).to(device, dtype)
        weight = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
        if not grad:
            return x, weight
        dy = torch.randn(rows, hidden, generator=gen, dtype=torch.float32).to(device, dtype)
        return x.requires_grad_(), weight.requires_grad_(), dy

    return make


def cases(device: torch.device, dtypes: list[torch.dtype], quick: bool) -> list[BenchCase]:
    """Forward ("fwd") and forward+backward ("fwd+bwd") of llama RMSNorm [rows, H] per dtype.

    Bytes moved: fwd reads x and writes y; fwd+bwd adds reading dy and x and writing dx.
    """
    found = []
    for rows, hidden in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            size = dtype.itemsize
            row_bytes = rows * hidden * size
            common = dict(kernel=KERNEL, shape=f"[{rows}, {hidden}]", dtype=dtype)
            found.append(BenchCase(
                mode="fwd", make_inputs=_inputs(rows, hidden, dtype, device, grad=False),
                ours=_ours_forward, reference=_reference_forward,
                bytes_moved=2 * row_bytes + hidden * size, **common,
            ))
            found.append(BenchCase(
                mode="fwd+bwd", make_inputs=_inputs(rows, hidden, dtype, device, grad=True),
                ours=_with_backward(_ours_forward), reference=_with_backward(_reference_forward),
                bytes_moved=5 * row_bytes + 2 * hidden * size, **common,
            ))
    return found
