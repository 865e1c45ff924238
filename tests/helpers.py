"""Helpers shared by the tests: tolerances per dtype, comparison, backend lists."""

from __future__ import annotations

import importlib.util

import torch

from mm_kernels.dispatch import backends

# Values compared against a reference computed in fp32 (or fp64), per DESIGN.md section 4.
TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when triton is importable (the tests then run it under TRITON_INTERPRET=1 on CPU)."""
    return importlib.util.find_spec("triton") is not None


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors here (reference always; cpu when built; triton when installed)."""
    names = ["reference"]
    if backends()["cpu"]:
        names.append("cpu")
    if backends()["triton"]:
        names.append("triton")
    return names


def backend_params(with_triton: bool = True) -> list:
    """pytest params of the backends to test on CPU tensors: ``default`` (None: no backend forced, the
    device's own kernel through the dispatcher), then every CPU-runnable backend (triton marked)."""
    import pytest  # only here: benchmarks/gpu_check.py imports this module where pytest may be missing

    names = [b for b in cpu_backends() if with_triton or b != "triton"]
    return [pytest.param(None, id="default"),
            *(pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b for b in names)]


def device_for(backend: str | None) -> torch.device:
    """Device of the test tensors for ``backend``: Triton runs on CUDA when present, else interpreted on CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """atol/rtol for ``dtype``, both multiplied by ``scale`` (e.g. sqrt(rows) for weight gradients)."""
    tol = TOLERANCES[dtype]
    return {"atol": tol["atol"] * scale, "rtol": tol["rtol"] * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
                 name: str = "") -> None:
    """Compares ``actual`` with an fp32/fp64 ``expected`` using the tolerance of ``dtype``."""
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tolerance(dtype, scale),
                               msg=lambda m: f"{name}: {m}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in fp64; the absolute error when expected is all zeros."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    largest = expected.double().abs().max().item()
    return diff / largest if largest > 0 else diff
