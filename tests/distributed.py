"""Helpers for distributed tests: spawned gloo groups (with timeouts) and error measures."""

from __future__ import annotations

import torch

from mm_kernels.parallel.spawn import run_ranks

__all__ = ["relative_error", "run_ranks"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in fp64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max()
    return (diff / expected.double().abs().max().clamp_min(1e-300)).item()
