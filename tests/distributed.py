"""Spawned gloo process groups for multi-process tests (DESIGN.md section 4).

``run_on_ranks(fn, world_size, *args)`` starts ``world_size`` processes on 127.0.0.1 with a
free port, calls ``fn(rank, world_size, *args)`` in each inside an initialised gloo group,
and fails the test with the rank's traceback if one raises, or after ``timeout`` seconds
(the processes are then killed), so a hang never blocks the suite. ``fn`` must be a
module-level function (it is pickled into the spawned processes).
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, fn: Callable[..., None], world_size: int, port: int, timeout: float,
                args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., None], world_size: int, *args: object, timeout: float = 120.0) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; raises on error/timeout."""
    context = mp.start_processes(_rank_entry, args=(fn, world_size, free_port(), timeout, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish within {timeout:.0f} s")
