"""Precision rules shared by every backend: which dtypes the fused kernels take, and what they compute in."""

from __future__ import annotations

import torch

# Floating-point dtypes the fused kernels (cpu, triton, npu) take. A floating-point input of any
# other dtype (fp64, used as a test oracle) runs the reference implementation.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of statistics and accumulators for inputs of ``dtype``: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def runs_on_reference(t: torch.Tensor) -> bool:
    """True when ``t`` is a floating-point tensor of a dtype the fused kernels do not take."""
    return t.is_floating_point() and t.dtype not in KERNEL_DTYPES
