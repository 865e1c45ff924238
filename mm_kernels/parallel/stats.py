"""Optional accounting of context-parallel attention: bytes this rank sends and time in local attention.

Off unless a :func:`record_cp_stats` block is active, so normal calls pay one global lookup.
Compute time is measured around each local attention kernel call: wall time, and the calling
thread's CPU time (meaningful with one intra-op thread, robust when ranks share cores). On GPUs the
kernels are asynchronous, so the figures are host-side only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator


@dataclasses.dataclass
class CPStats:
    """Totals since the block started: ``bytes_sent`` by this rank, ``compute_s`` wall seconds and
    ``compute_cpu_s`` thread CPU seconds inside local attention kernels, ``kernel_calls``."""

    bytes_sent: int = 0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    kernel_calls: int = 0


_active: CPStats | None = None


@contextlib.contextmanager
def record_cp_stats() -> Iterator[CPStats]:
    """Collects :class:`CPStats` of the cp_attention calls (forward and backward) inside the block."""
    global _active
    previous, _active = _active, CPStats()
    try:
        yield _active
    finally:
        _active = previous


def count_sent(nbytes: int) -> None:
    """Adds ``nbytes`` sent by this rank to the active record, if any."""
    if _active is not None:
        _active.bytes_sent += nbytes


@contextlib.contextmanager
def timed_compute() -> Iterator[None]:
    """Adds the time spent inside the block to the active record's compute time, if any."""
    if _active is None:
        yield
        return
    record = _active
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        record.compute_s += time.perf_counter() - wall
        record.compute_cpu_s += time.thread_time() - cpu
        record.kernel_calls += 1
