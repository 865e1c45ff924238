"""Timing harness shared by every kernel benchmark.

A :class:`BenchCase` names one kernel call (shape, dtype, forward or forward+backward)
with our implementation and the plain PyTorch reference. :func:`run_case` times ours,
the eager reference and ``torch.compile`` of the reference, and for memory-bound kernels
relates the achieved bandwidth to the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mm_kernels.dispatch import select_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class BenchCase:
    """One benchmarked call.

    ``make_inputs`` builds fresh inputs; ``ours`` and ``reference`` take them as
    positional arguments. ``bytes_moved`` is the least memory traffic the call needs
    (inputs read once, outputs written once), or None for compute-bound kernels.
    """

    kernel: str
    mode: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], Sequence[Any]]
    ours: Callable[..., Any]
    reference: Callable[..., Any]
    bytes_moved: int | None = None


@dataclasses.dataclass
class BenchResult:
    """Timings of one case in milliseconds (medians) and the derived ratios."""

    kernel: str
    mode: str
    shape: str
    dtype: str
    backend: str
    ours_ms: float
    eager_ms: float
    compile_ms: float | None
    speedup_vs_eager: float
    speedup_vs_compile: float | None
    gbps: float | None
    copy_gbps: float | None
    pct_of_copy: float | None
    peak_mem_mb: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, min_reps: int = 10,
              min_seconds: float = 0.5, max_reps: int = 200) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` calls; repeats until both minimums are met."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_copy_cache: dict[tuple[str, int], float] = {}


def copy_bandwidth_gbps(nbytes: int, device: torch.device) -> float:
    """Achieved GB/s (bytes read + written) of ``dst.copy_(src)`` moving ``nbytes`` in total."""
    key = (str(device), nbytes)
    if key not in _copy_cache:
        numel = max(nbytes // 2 // 4, 1)
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device)
        _copy_cache[key] = 2 * numel * 4 / (ms * 1e-3) / 1e9
    return _copy_cache[key]


def _peak_mem_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(case: BenchCase, device: torch.device, with_compile: bool = True) -> BenchResult:
    """Times ``case`` (ours, eager reference, torch.compile of the reference) on ``device``."""
    inputs = case.make_inputs()
    backend = select_backend(device)
    ours_ms = median_ms(lambda: case.ours(*inputs), device)
    eager_ms = median_ms(lambda: case.reference(*inputs), device)
    compile_ms = None
    if with_compile:
        compiled = torch.compile(case.reference, dynamic=False)
        compile_ms = median_ms(lambda: compiled(*inputs), device, warmup=2)
    gbps = copy_gbps = pct = None
    if case.bytes_moved:
        gbps = case.bytes_moved / (ours_ms * 1e-3) / 1e9
        copy_gbps = copy_bandwidth_gbps(case.bytes_moved, device)
        pct = 100.0 * gbps / copy_gbps
    return BenchResult(
        kernel=case.kernel,
        mode=case.mode,
        shape=case.shape,
        dtype=str(case.dtype).removeprefix("torch."),
        backend=backend,
        ours_ms=ours_ms,
        eager_ms=eager_ms,
        compile_ms=compile_ms,
        speedup_vs_eager=eager_ms / ours_ms,
        speedup_vs_compile=None if compile_ms is None else compile_ms / ours_ms,
        gbps=gbps,
        copy_gbps=copy_gbps,
        pct_of_copy=pct,
        peak_mem_mb=_peak_mem_mb(lambda: case.ours(*inputs), device),
    )


def format_table(results: Sequence[BenchResult]) -> str:
    """Fixed-width text table of results, one row per case."""
    headers = ["kernel", "mode", "shape", "dtype", "backend", "ours ms", "eager ms", "compile ms",
               "x eager", "x compile", "GB/s", "copy GB/s", "% copy", "peak MB"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [
        [r.kernel, r.mode, r.shape, r.dtype, r.backend, fmt(r.ours_ms, ".3f"), fmt(r.eager_ms, ".3f"),
         fmt(r.compile_ms, ".3f"), fmt(r.speedup_vs_eager, ".2f"), fmt(r.speedup_vs_compile, ".2f"),
         fmt(r.gbps, ".1f"), fmt(r.copy_gbps, ".1f"), fmt(r.pct_of_copy, ".0f"), fmt(r.peak_mem_mb, ".1f")]
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
