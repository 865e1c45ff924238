"""Backend discovery and selection.

Every kernel has up to four implementations: ``reference`` (plain PyTorch, always present),
``cpu`` (C++ extension), ``triton`` (CUDA GPUs, Ascend via triton-ascend, or any device
under ``TRITON_INTERPRET=1``) and ``npu`` (torch_npu fused ops). Normally the dispatcher picks
one from the device of the input (the ``torch.ops.mm_kernels`` operators have a kernel per
device, see :mod:`mm_kernels.ops._kernel_op`). ``MM_KERNELS_BACKEND`` (read when mm_kernels is
imported) or :func:`use_backend` (for the current thread or task) forces one instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from mm_kernels._extension import cpu_extension, cpu_extension_error

BACKENDS = ("reference", "cpu", "triton", "npu")
ENV_VAR = "MM_KERNELS_BACKEND"
# MM_KERNELS_DEBUG=1: index values on accelerators are checked on the host, with a clear error naming the
# argument, at the cost of a device sync per call (by default they are asynchronous device assertions).
DEBUG_ENV_VAR = "MM_KERNELS_DEBUG"

# The backend forced by use_backend in the current context (thread, asyncio task).
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mm_kernels_forced_backend", default=None)
_env_forced: str | None = None
_host_checks = False
_warned: set[tuple[str, str]] = set()
# The backend each device type prefers; other device types prefer triton.
_PREFERRED = {"cpu": "cpu", "npu": "npu"}


def read_environment() -> None:
    """(Re-)reads ``MM_KERNELS_BACKEND`` and ``MM_KERNELS_DEBUG``; mm_kernels calls this once, on import."""
    global _env_forced, _host_checks
    _env_forced = os.environ.get(ENV_VAR) or None
    _host_checks = os.environ.get(DEBUG_ENV_VAR, "0") not in ("", "0")


read_environment()


def host_checks() -> bool:
    """True when values on accelerators are checked on the host (``MM_KERNELS_DEBUG=1``)."""
    return _host_checks


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), e.g. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    """True when the triton package is installed (it is not imported)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def npu_importable() -> bool:
    """True when torch_npu is installed (it is not imported)."""
    return importlib.util.find_spec("torch_npu") is not None


@functools.cache
def _npu_available() -> bool:
    if not npu_importable():
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
        "triton": triton_importable() and (gpu or triton_interpreted()),
        "npu": _npu_available(),
    }


def check_backend_name(name: str, source: str) -> str:
    """``name`` if it is a backend; else ValueError naming ``source`` (where the name came from)."""
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


@torch.compiler.assume_constant_result
def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``MM_KERNELS_BACKEND``, or None.

    Raises RuntimeError if the forced backend is not available on this machine. Inside
    ``torch.compile`` it is read once, when the graph is traced.
    """
    name = _forced.get()
    source = "use_backend"
    if name is None:
        name, source = _env_forced, ENV_VAR
        if name is None:
            return None
    check_backend_name(name, source)
    if not backends()[name]:
        raise RuntimeError(f"backend {name!r} was forced but is not available here (backends: {backends()})")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Forces every mm_kernels call inside the block, in this thread or task, to run on backend ``name``.

    None: no override (MM_KERNELS_BACKEND still applies). Blocks nest; other threads are not affected.
    """
    if name is not None:
        check_backend_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _warn_unavailable(backend: str, device_type: str) -> None:
    """Warns once per (backend, device type) that calls fall back to the reference implementation."""
    if (backend, device_type) in _warned:
        return
    _warned.add((backend, device_type))
    reason = ""
    if backend == "cpu":
        reason = (f" (the compiled CPU kernels could not be loaded: {cpu_extension_error()}; build them with "
                  "`pip install --no-build-isolation -e .`)")
    warnings.warn(f"mm_kernels: backend {backend!r} is not available for {device_type} tensors{reason}; "
                  "using the reference implementation", RuntimeWarning, stacklevel=3)


def auto_backend(device: torch.device) -> str:
    """The backend for tensors on ``device`` when none is forced: the device's own if available, else
    ``reference`` (with one warning per backend and device type)."""
    wanted = _PREFERRED.get(device.type, "triton")
    if backends()[wanted]:
        return wanted
    _warn_unavailable(wanted, device.type)
    return "reference"


def select_backend(device: torch.device) -> str:
    """Backend that runs a call on tensors on ``device``: the forced one, else :func:`auto_backend`."""
    return forced_backend() or auto_backend(device)
