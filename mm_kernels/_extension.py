"""Loads the compiled CPU kernels (``mm_kernels._C``) once, warning once if they are missing."""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The loaded ``mm_kernels._C`` module, or None (with one warning) if it cannot be loaded.

    Importing it registers the C++ operators under ``torch.ops.mm_kernels_cpu``.
    """
    try:
        return importlib.import_module("mm_kernels._C")
    except ImportError as exc:
        warnings.warn(
            f"mm_kernels: the compiled CPU kernels could not be loaded ({exc}); CPU tensors use the "
            "reference PyTorch implementations. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
