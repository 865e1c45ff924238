"""Where this process runs: its place in the world torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK,
NPUS_PER_NODE), the one device detection of the trainer, and the process group."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from mm_kernels.parallel.spawn import free_port
from mm_train.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """Where this process sits: global rank, world size, local rank, device type ('cpu'/'cuda'/'npu')."""

    rank: int
    world_size: int
    local_rank: int
    device_type: str

    @property
    def device(self) -> torch.device:
        """This process's device: the CPU, or accelerator ``local_rank``."""
        return torch.device("cpu") if self.device_type == "cpu" else torch.device(self.device_type, self.local_rank)


def int_env(name: str, low: int, high: int | None) -> int | None:
    """The integer in environment variable ``name`` (None when unset or empty); ConfigError (one line)
    when it is not an integer in [low, high] (no upper bound when ``high`` is None)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{name}={value} is out of range {bound}")
    return value


@functools.cache
def _ascend_npu() -> bool:
    """True when torch_npu is installed and sees an NPU. torch_npu is imported first (it adds ``torch.npu``),
    and then, as MindSpeed does, ``torch_npu.contrib.transfer_to_npu``, which redirects megatron-core's
    ``torch.cuda`` calls and ``"cuda"`` devices to the NPU."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    importlib.import_module("torch_npu")
    if not torch.npu.is_available():
        return False
    importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return True


def device_type() -> str:
    """'npu' (Ascend, checked first: torch_npu redirects torch.cuda), 'cuda', or 'cpu'."""
    if _ascend_npu():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def collective_device() -> torch.device:
    """Where the tensors of the default process group's collectives live: the CPU for gloo, else this
    process's current accelerator."""
    backend = torch.distributed.get_backend()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("npu", torch.npu.current_device())


def read_launch(local_rank_flag: int | None = None) -> Launch:
    """The layout torchrun (or a plain single-process start) put in RANK/WORLD_SIZE/LOCAL_RANK;
    ``local_rank_flag`` (``--local-rank``, what ``python -m torch.distributed.launch`` passes) is used
    when LOCAL_RANK is not set."""
    world_size = int_env("WORLD_SIZE", 1, None) or 1
    rank = int_env("RANK", 0, None) or 0
    local_rank = int_env("LOCAL_RANK", 0, None)
    if local_rank is None:
        local_rank = local_rank_flag or 0
    devices_per_node = int_env("NPUS_PER_NODE", 1, None)
    local_world = int_env("LOCAL_WORLD_SIZE", 1, None)
    if devices_per_node is not None and local_world is not None and local_world > devices_per_node:
        raise ConfigError(f"LOCAL_WORLD_SIZE={local_world} processes on this node but NPUS_PER_NODE={devices_per_node}")
    return Launch(rank, world_size, local_rank, device_type())


def print_rank_0(text: str) -> None:
    """Prints ``text`` on global rank 0 (every process without a process group), as Megatron's print_rank_0."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _print_line(text)


def is_last_rank() -> bool:
    """True on the last global rank (it holds the loss under pipeline parallelism), or without a process group."""
    return not torch.distributed.is_initialized() or (
        torch.distributed.get_rank() == torch.distributed.get_world_size() - 1)


def print_last_rank(text: str) -> None:
    """Prints ``text`` on the last global rank, as Megatron's print_rank_last."""
    if is_last_rank():
        _print_line(text)


def _print_line(text: str) -> None:
    """``text`` and its newline in one write: ranks share the launcher's stdout, and print() writes the
    newline separately when Python's output is unbuffered (PYTHONUNBUFFERED), so lines of two ranks
    could join (log readers such as MindSpeed-MM's post-processing then miss an iteration)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def init_process_group(launch: Launch, backend: str, timeout: timedelta) -> None:
    """Starts torch.distributed on ``backend`` with ``timeout`` per collective (a single-process run gets a
    one-rank group on a free local port) and makes accelerator ``local_rank`` current."""
    if launch.device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    elif launch.device_type == "npu":
        torch.npu.set_device(launch.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    torch.distributed.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                         timeout=timeout)
