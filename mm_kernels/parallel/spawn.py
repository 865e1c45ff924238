"""Runs a function on W local processes joined in a gloo process group (tests and benchmarks).

Every collective has ``collective_timeout`` seconds (so a rank that waits for a missing peer raises),
and the whole run has ``timeout`` seconds, after which every process is killed: nothing hangs.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serialize(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(rank: int, world_size: int, port: int, collective_timeout: float, threads: int,
               fn: Callable[..., Any], args: tuple, results: Any) -> None:
    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        value = fn(rank, world_size, *args)
        results.put((rank, True, _serialize(value)))
    except BaseException:  # noqa: B036 - report everything, the parent raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0,
              collective_timeout: float = 60.0, threads: int = 1) -> list[Any]:
    """Calls ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one gloo group.

    ``fn`` must be importable (module level); its return value (tensors allowed) comes back per rank,
    in rank order. Raises RuntimeError with the rank's traceback when a rank fails, TimeoutError when
    the ranks have not all finished after ``timeout`` seconds (all processes are then killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(rank, world_size, port, collective_timeout, threads, fn, args, results))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(values) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world_size - len(values) - len(failures)} of {world_size} ranks did not finish "
                                   f"within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if not failures and any(p.exitcode not in (None, 0) for p in procs):
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    raise RuntimeError(f"rank(s) {dead} died without a result") from None
                continue
            if ok:
                values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                failures.append(f"rank {rank} failed:\n{payload}")
    finally:
        for proc in procs:
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [values[rank] for rank in range(world_size)]
