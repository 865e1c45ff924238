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

from torch import Tensor


@dataclasses.dataclass
class CPStats:
    """Totals since the block started: ``bytes_sent`` by this rank, ``compute_s`` wall seconds and
    ``compute_cpu_s`` thread CPU seconds inside local attention kernels, ``kernel_calls``, and
    ``flops``: the matrix-multiply FLOPs those calls need (causal blocks count half; backward 2.5x)."""

    bytes_sent: int = 0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0
    kernel_calls: int = 0
    flops: float = 0.0


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


def attention_flops(q: Tensor, k: Tensor, causal: bool, backward: bool = False) -> float:
    """Matrix-multiply FLOPs of attention of q [B, Sq, Hq, D] over k [B, Sk, Hkv, D]: 4 B Hq Sq Sk D forward
    (QK^T and PV), 2.5x that backward (five products instead of two), half of it when causal."""
    batch, seq_q, heads, dim = q.shape
    flops = 4.0 * batch * heads * seq_q * k.shape[1] * dim * (2.5 if backward else 1.0)
    return flops / 2 if causal else flops


@contextlib.contextmanager
def timed_compute(q: Tensor, k: Tensor, causal: bool, backward: bool = False) -> Iterator[None]:
    """Adds the time spent inside the block, and the FLOPs of attention of q over k, to the active record."""
    if _active is None:
        yield
        return
    record = _active
    record.flops += attention_flops(q, k, causal, backward)
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        record.compute_s += time.perf_counter() - wall
        record.compute_cpu_s += time.thread_time() - cpu
        record.kernel_calls += 1
