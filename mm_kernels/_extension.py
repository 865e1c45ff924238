"""Loads the compiled CPU kernels (``mm_kernels._C``) once; a missing build is reported by the dispatch."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("mm_kernels._C"), ""
    except ImportError as exc:
        return None, str(exc)


def cpu_extension() -> ModuleType | None:
    """The loaded ``mm_kernels._C`` module, or None when it cannot be loaded.

    Loading it registers the C++ operators under ``torch.ops.mm_kernels_cpu`` and as the CPU
    kernels of the ``torch.ops.mm_kernels`` operators.
    """
    return _load()[0]


def cpu_extension_error() -> str:
    """Why ``mm_kernels._C`` could not be loaded ("" when it was)."""
    return _load()[1]
