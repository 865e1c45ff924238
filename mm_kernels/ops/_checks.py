"""Input checks shared by the public ops: clear Python exceptions naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object) -> Tensor:
    """Raises TypeError unless ``value`` is a tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value: object) -> Tensor:
    """Raises TypeError unless ``value`` is a floating-point tensor (fp32, fp16, bf16, fp64)."""
    tensor = check_tensor(name, value)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, float64), got {tensor.dtype}")
    return tensor


def check_min_dim(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    """Raises ValueError unless ``tensor`` has at least ``ndim`` dimensions (``layout`` names them)."""
    if tensor.dim() < ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")


def check_same_device(**tensors: Tensor | None) -> None:
    """Raises ValueError unless all given tensors are on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must be on one device: {where}")


INDEX_DTYPES = (torch.int32, torch.int64)


def check_index(name: str, value: object) -> Tensor:
    """Raises TypeError unless ``value`` is an int32 or int64 tensor."""
    tensor = check_tensor(name, value)
    if tensor.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {tensor.dtype}")
    return tensor


def check_shape(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    """Raises ValueError unless ``tensor`` has exactly ``ndim`` dimensions (``layout`` names them)."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}")
