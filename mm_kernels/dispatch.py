"""Backend discovery and selection.

Every kernel has up to four implementations: ``reference`` (plain PyTorch, always present),
``cpu`` (C++ extension), ``triton`` (CUDA GPUs, Ascend via triton-ascend, or any device
under ``TRITON_INTERPRET=1``) and ``npu`` (torch_npu fused ops). A call picks one from the
device of its input, unless ``MM_KERNELS_BACKEND`` or :func:`use_backend` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from mm_kernels._extension import cpu_extension

BACKENDS = ("reference", "cpu", "triton", "npu")
ENV_VAR = "MM_KERNELS_BACKEND"

_forced: str | None = None
_warned: set[tuple[str, str]] = set()


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401

    return hasattr(torch, "npu") and torch.npu.is_available()


@functools.cache
def backends() -> dict[str, bool]:
    """Which backends can run here: ``{"reference": True, "cpu": bool, "triton": bool, "npu": bool}``.

    Read once per process (``TRITON_INTERPRET`` must be set before the first call).
    """
    gpu = torch.cuda.is_available() or _npu_available()
    return {
        "reference": True,
        "cpu": cpu_extension() is not None,
        "triton": _triton_importable() and (gpu or triton_interpreted()),
        "npu": _npu_available(),
    }


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``MM_KERNELS_BACKEND``, or None.

    Raises RuntimeError if the forced backend is not available on this machine.
    """
    name = _forced if _forced is not None else os.environ.get(ENV_VAR) or None
    if name is None:
        return None
    _check_name(name, ENV_VAR if _forced is None else "use_backend")
    if not backends()[name]:
        raise RuntimeError(f"backend {name!r} was forced but is not available here (backends: {backends()})")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Forces every mm_kernels call inside the block to run on backend ``name`` (None: no override; MM_KERNELS_BACKEND still applies)."""
    global _forced
    if name is not None:
        _check_name(name, "use_backend")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _preferred(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "npu":
        return "npu"
    return "triton"


def warn_once(op: str, wanted: str, reason: str) -> None:
    """Warns once per (op, backend) that ``op`` falls back to the reference implementation."""
    if (op, wanted) in _warned:
        return
    _warned.add((op, wanted))
    warnings.warn(f"mm_kernels.{op}: {reason}; using the reference implementation", RuntimeWarning, stacklevel=3)


def select_backend(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Backend that runs ``op`` for tensors on ``device``.

    ``implemented`` lists the backends that have a kernel for ``op``. A forced backend
    that lacks one raises; an automatic choice that is unavailable falls back to
    ``reference`` with one warning.
    """
    forced = forced_backend()
    if forced is not None:
        if forced not in implemented:
            raise RuntimeError(f"mm_kernels.{op} has no {forced!r} kernel (it has: {', '.join(implemented)})")
        return forced
    wanted = _preferred(device)
    if wanted not in implemented:
        warn_once(op, wanted, f"no {wanted!r} kernel")
        return "reference"
    if not backends()[wanted]:
        warn_once(op, wanted, f"backend {wanted!r} is not available for {device.type} tensors")
        return "reference"
    return wanted
