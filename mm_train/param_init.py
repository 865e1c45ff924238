"""Parameter initialisation keyed by (seed, global parameter name).

Each parameter is drawn in full, in fp32 on the CPU, from a generator seeded by a hash of the
run seed and the parameter's name in the unwrapped model, then cast and copied into the
parameter; a sharded parameter (a DTensor, e.g. after FSDP2 ``fully_shard``) keeps only its
local slice of that draw. The result is therefore the same full model for any parallel layout,
and at most one full parameter exists at a time on any rank.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

MEGATRON_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the global parameter ``name`` (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class KeyedInit:
    """How each parameter is initialised, as a function of its global name and shape.

    Rules, in order: names ending in ``bias`` -> zeros; other 1-D parameters (norm weights) ->
    ones; names ending in one of ``output_projections`` -> normal(0, std / sqrt(2 * num_layers))
    when ``num_layers`` is given (Megatron's scaled init of output projections); everything
    else -> normal(0, std).
    """

    seed: int
    std: float = 0.02
    num_layers: int | None = None
    output_projections: tuple[str, ...] = MEGATRON_OUTPUT_PROJECTIONS

    def full_value(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The full fp32 CPU tensor of ``shape`` for parameter ``name``."""
        if name.endswith("bias"):
            return torch.zeros(shape)
        if len(shape) == 1:
            return torch.ones(shape)
        std = self.std
        if self.num_layers is not None and name.endswith(self.output_projections):
            std = self.std / math.sqrt(2.0 * self.num_layers)
        return torch.randn(shape, generator=parameter_generator(self.seed, name)).mul_(std)


@torch.no_grad()
def init_parameters_(model: nn.Module, init: KeyedInit) -> nn.Module:
    """Initialises every parameter of ``model`` in place from ``init`` and returns ``model``.

    Names are those of ``model.named_parameters()``: pass the unwrapped model (not a DDP or
    Float16Module wrapper) so they are the global names. Plain tensors get the full value;
    DTensors get their local shard of it, with no communication.
    """
    for name, param in model.named_parameters():
        full = init.full_value(name, param.shape)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
    return model
