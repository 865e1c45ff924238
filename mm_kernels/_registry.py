"""Finds the kernel module of an op for a backend: ``mm_kernels.<backend>.<op>``."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from mm_kernels.dispatch import select_backend


def kernels_for(op: str, device: torch.device, implemented: tuple[str, ...]) -> ModuleType:
    """The module ``mm_kernels.<backend>.<op>`` of the backend chosen for ``op`` on ``device``.

    Each backend module of one op defines the same functions (e.g. ``rms_norm_fwd`` and
    ``rms_norm_bwd``), so callers stay backend-agnostic. Backend modules are imported on
    first use, so importing mm_kernels never imports triton or torch_npu.
    """
    backend = select_backend(op, device, implemented)
    return importlib.import_module(f"mm_kernels.{backend}.{op}")
