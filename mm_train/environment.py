"""The launch environment: world layout from torchrun, device, process-group backend, and the
reference's environment variables (HCCL_CONNECT_TIMEOUT, NPUS_PER_NODE, CUDA_DEVICE_MAX_CONNECTIONS)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from mm_train.cpu_adaptor import accelerator_present


class ConfigError(ValueError):
    """A bad flag, flag combination or environment variable; reported as one line, exit status 2."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits: global rank, world size, local rank, device type ('cpu'/'cuda'/'npu')."""

    rank: int
    world_size: int
    local_rank: int
    device_type: str


def _int_env(name: str, low: int, high: int | None) -> int | None:
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


def device_type() -> str:
    """'npu' or 'cuda' when such a device is usable, else 'cpu'."""
    if not accelerator_present():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "npu"


def read_launch() -> Launch:
    """The layout torchrun (or a plain single-process start) put in RANK/WORLD_SIZE/LOCAL_RANK."""
    world_size = _int_env("WORLD_SIZE", 1, None) or 1
    rank = _int_env("RANK", 0, None) or 0
    local_rank = _int_env("LOCAL_RANK", 0, None) or 0
    devices_per_node = _int_env("NPUS_PER_NODE", 1, None)
    local_world = _int_env("LOCAL_WORLD_SIZE", 1, None)
    if devices_per_node is not None and local_world is not None and local_world > devices_per_node:
        raise ConfigError(f"LOCAL_WORLD_SIZE={local_world} processes on this node but NPUS_PER_NODE={devices_per_node}")
    return Launch(rank, world_size, local_rank, device_type())


def check_device_connections(args, launch: Launch) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS: an integer in [1, 32], and 1 with sequence parallel or overlapped
    gradient reduction with TP > 1 on an accelerator (the ordering of TP communication relies on it)."""
    value = _int_env("CUDA_DEVICE_MAX_CONNECTIONS", 1, 32)
    overlapping = args.sequence_parallel or (args.overlap_grad_reduce and args.tensor_model_parallel_size > 1)
    if not overlapping:
        return
    if value is not None and value != 1:
        raise ConfigError(f"CUDA_DEVICE_MAX_CONNECTIONS={value} must be 1 with --sequence-parallel or "
                          "--overlap-grad-reduce under tensor parallelism")
    if value is None and launch.device_type != "cpu":
        raise ConfigError("set CUDA_DEVICE_MAX_CONNECTIONS=1 for --sequence-parallel or --overlap-grad-reduce "
                          "under tensor parallelism")


def process_group_timeout(args) -> timedelta:
    """HCCL_CONNECT_TIMEOUT seconds (an integer in [120, 7200]) if set, else --distributed-timeout-minutes."""
    seconds = _int_env("HCCL_CONNECT_TIMEOUT", 120, 7200)
    if seconds is not None:
        return timedelta(seconds=seconds)
    return timedelta(minutes=args.distributed_timeout_minutes)


def backend_for(args, launch: Launch) -> str:
    """The process-group backend: --distributed-backend, or hccl / nccl / gloo by device."""
    default = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[launch.device_type]
    backend = args.distributed_backend or default
    if launch.device_type == "cpu" and backend != "gloo":
        raise ConfigError(f"--distributed-backend {backend} needs an accelerator; this machine has none (use gloo)")
    return backend


def init_process_group(args, launch: Launch) -> None:
    """Starts torch.distributed (single-process runs get a one-rank group on a free local port)."""
    if launch.device_type == "cuda":
        torch.cuda.set_device(launch.local_rank)
    elif launch.device_type == "npu":
        torch.npu.set_device(launch.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    torch.distributed.init_process_group(backend=backend_for(args, launch), rank=launch.rank,
                                         world_size=launch.world_size, timeout=process_group_timeout(args))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
