"""Initialising parameters, plain or FSDP2-sharded, from a full value keyed by global name.

``full_value(name, shape)`` returns the whole fp32 value of the parameter called ``name`` (the
trainer's draw from a generator keyed by (seed, global name) is one). A plain parameter gets
it all; a sharded parameter (a DTensor, e.g. after FSDP2 ``fully_shard``) keeps only its local
slice, cut locally with no communication. The result is the same full model for any layout,
and a rank holds at most one full parameter at a time beyond its shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

FullValue = Callable[[str, torch.Size], torch.Tensor]


@torch.no_grad()
def copy_full_value_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Sets ``param`` (plain tensor, or DTensor shard) from ``full``, the whole parameter's value
    (same shape as the global parameter; any float dtype, cast on copy)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def init_parameters_(model: nn.Module, full_value: FullValue) -> nn.Module:
    """Sets every parameter of ``model`` from ``full_value(name, global shape)`` and returns ``model``.

    Names are those of ``model.named_parameters()``; FSDP2 keeps them, so pass the unwrapped
    model (not a DDP or Float16Module wrapper) to get the global names.
    """
    for name, param in model.named_parameters():
        copy_full_value_(param, full_value(name, param.shape))
    return model
