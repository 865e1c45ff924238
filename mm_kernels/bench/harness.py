"""Timing harness shared by every kernel benchmark.

A :class:`BenchCase` is one forward function call (kernel, shape, dtype) in one timing mode:
``fwd`` (no autograd recording), ``bwd`` (the backward of an already computed output) or
``fwd+bwd``. It names our function, the eager PyTorch baseline a user would write instead and,
on CUDA, Liger-Kernel's when installed. :func:`run_case` times each of them and ``torch.compile``
of the eager baseline, and for memory-bound kernels relates the achieved bandwidth to the
device's copy bandwidth measured in the same run. CUDA timings come from CUDA events with the L2
cache flushed before each call (``triton.testing.do_bench`` when triton is installed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mm_kernels.dispatch import select_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMINGS = ("fwd", "bwd", "fwd+bwd")


def timings(device: torch.device) -> tuple[str, ...]:
    """The timings benchmarked on ``device``: on CUDA fwd and bwd only (device times add up, and each row
    costs a torch.compile), everywhere else all three."""
    return TIMINGS[:2] if device.type == "cuda" else TIMINGS


@dataclasses.dataclass
class BenchCase:
    """One benchmarked call.

    ``make_inputs()`` builds fresh positional arguments for the forward functions ``ours``, ``eager``
    and ``liger`` (None: not available), each returning one tensor. In the ``bwd`` and ``fwd+bwd``
    timings the arguments at ``grad_of`` require grad and the gradient of the output with respect to
    them is taken. ``mode`` is the row's label (the timing unless given). ``bytes_moved`` is the least
    memory traffic of the call (inputs read once, outputs written once), or None.
    """

    kernel: str
    timing: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], Sequence[Any]]
    ours: Callable[..., torch.Tensor]
    eager: Callable[..., torch.Tensor]
    liger: Callable[..., torch.Tensor] | None = None
    bytes_moved: int | None = None
    grad_of: tuple[int, ...] = ()
    mode: str = ""

    def __post_init__(self) -> None:
        if self.timing not in TIMINGS:
            raise ValueError(f"timing must be one of {TIMINGS}, got {self.timing!r}")
        self.mode = self.mode or self.timing


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
    liger_ms: float | None
    speedup_vs_eager: float
    speedup_vs_compile: float | None
    speedup_vs_liger: float | None
    gbps: float | None
    copy_gbps: float | None
    pct_of_copy: float | None
    peak_mem_mb: float | None


def _cpu_medians_ms(fns: Sequence[Callable[[], Any]], min_samples: int = 15, min_seconds: float = 0.5,
                    sample_seconds: float = 2e-3) -> list[float]:
    """Median CPU wall time of one call of each of ``fns`` in ms. The functions are timed in turn, sample
    after sample, so that they see the same load on a shared machine; short calls in batches of
    ~``sample_seconds``."""
    batches = []
    for fn in fns:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        batches.append(max(1, int(sample_seconds / max(time.perf_counter() - t0, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < 200 and (len(times[0]) < min_samples or time.perf_counter() - start < min_seconds):
        for fn, batch, samples in zip(fns, batches, times, strict=True):
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / batch)
    return [statistics.median(samples) for samples in times]


def _cuda_median_ms(fn: Callable[[], Any]) -> float:
    """Median device time of one ``fn()`` in ms, from CUDA events, the L2 cache flushed before each call."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median time of one ``fn()`` in ms on ``device`` (wall time on CPU, device time on CUDA)."""
    if device.type == "cuda":
        return _cuda_median_ms(fn)
    return _cpu_medians_ms([fn])[0]


def _copy(nbytes: int, device: torch.device) -> tuple[Callable[[], Any], int]:
    """``dst.copy_(src)`` of fp32 tensors moving about ``nbytes`` (read + written), and the bytes it moves."""
    numel = max(nbytes // 2 // 4, 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * numel * 4


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(nbytes: int, device: torch.device) -> float:
    """Achieved GB/s (bytes read + written) of ``dst.copy_(src)`` moving ``nbytes`` in total."""
    copy, moved = _copy(nbytes, device)
    return _gbps(moved, median_ms(copy, device))


def _timed(forward: Callable[..., torch.Tensor], case: BenchCase, inputs: Sequence[Any]) -> Callable[[], Any]:
    """The zero-argument call to time: ``forward`` on ``inputs`` in ``case.timing``."""
    if case.timing == "fwd":
        def call():
            with torch.no_grad():
                return forward(*inputs)
        return call
    wrt = [inputs[i] for i in case.grad_of]
    dy = torch.randn_like(forward(*inputs))
    if case.timing == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(*inputs), wrt, dy)
    out = forward(*inputs)
    return lambda: torch.autograd.grad(out, wrt, dy, retain_graph=True)


def _peak_mem_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _ratio(baseline_ms: float | None, ours_ms: float) -> float | None:
    return None if baseline_ms is None else baseline_ms / ours_ms


def run_case(case: BenchCase, device: torch.device, with_compile: bool = True) -> BenchResult:
    """Times ``case`` on ``device``: ours, the eager baseline, torch.compile of it and Liger-Kernel's."""
    inputs = case.make_inputs()
    ours = _timed(case.ours, case, inputs)
    copy_gbps = None
    if case.bytes_moved and device.type == "cpu":
        # Ours and the copy timed in turn: on a shared machine both see the same load.
        copy, moved = _copy(case.bytes_moved, device)
        ours_ms, copy_ms = _cpu_medians_ms([ours, copy])
        copy_gbps = _gbps(moved, copy_ms)
    else:
        ours_ms = median_ms(ours, device)
    eager_ms = median_ms(_timed(case.eager, case, inputs), device)
    compile_ms = liger_ms = None
    if with_compile:
        torch._dynamo.reset()  # a fresh compilation per case: no recompile limit reached across shapes
        compiled = torch.compile(case.eager, dynamic=False)
        compile_ms = median_ms(_timed(compiled, case, inputs), device)
    if case.liger is not None:
        liger_ms = median_ms(_timed(case.liger, case, case.make_inputs()), device)
    gbps = pct = None
    if case.bytes_moved:
        gbps = _gbps(case.bytes_moved, ours_ms)
        copy_gbps = copy_gbps or copy_bandwidth_gbps(case.bytes_moved, device)
        pct = 100.0 * gbps / copy_gbps
    return BenchResult(
        kernel=case.kernel,
        mode=case.mode,
        shape=case.shape,
        dtype=str(case.dtype).removeprefix("torch."),
        backend=select_backend(device),
        ours_ms=ours_ms,
        eager_ms=eager_ms,
        compile_ms=compile_ms,
        liger_ms=liger_ms,
        speedup_vs_eager=eager_ms / ours_ms,
        speedup_vs_compile=_ratio(compile_ms, ours_ms),
        speedup_vs_liger=_ratio(liger_ms, ours_ms),
        gbps=gbps,
        copy_gbps=copy_gbps,
        pct_of_copy=pct,
        peak_mem_mb=_peak_mem_mb(ours, device),
    )


def format_table(results: Sequence[BenchResult]) -> str:
    """Fixed-width text table of results, one row per case (the Liger columns only when measured)."""
    with_liger = any(r.liger_ms is not None for r in results)
    headers = ["kernel", "mode", "shape", "dtype", "backend", "ours ms", "eager ms", "compile ms",
               *(["liger ms"] if with_liger else []), "x eager", "x compile", *(["x liger"] if with_liger else []),
               "GB/s", "copy GB/s", "% copy", "peak MB"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ms(value: float | None) -> str:
        return fmt(value, ".4f" if value is not None and value < 0.1 else ".3f")

    rows = [
        [r.kernel, r.mode, r.shape, r.dtype, r.backend, ms(r.ours_ms), ms(r.eager_ms), ms(r.compile_ms),
         *([ms(r.liger_ms)] if with_liger else []), fmt(r.speedup_vs_eager, ".2f"), fmt(r.speedup_vs_compile, ".2f"),
         *([fmt(r.speedup_vs_liger, ".2f")] if with_liger else []), fmt(r.gbps, ".1f"), fmt(r.copy_gbps, ".1f"),
         fmt(r.pct_of_copy, ".0f"), fmt(r.peak_mem_mb, ".1f")]
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) Python process; its result, or its exception raised here."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def sync(device: torch.device | str) -> None:
    """Waits for the work queued on ``device`` (CUDA; nothing to wait for on the CPU) before a clock is read."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def add_step_arguments(parser: argparse.ArgumentParser, steps: int, steps_help: str) -> None:
    """Adds --steps (default ``steps``), --warmup, --threads and --json, the options every training-step
    benchmark takes; --steps and --threads must be >= 1, --warmup >= 0 (argparse's one-line error)."""
    parser.add_argument("--steps", type=at_least(1), default=steps, help=f"{steps_help} (default {steps})")
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first (default 2)")
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                        help=f"CPU threads per run (default {torch.get_num_threads()})")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse
