"""``--init-model-with-meta-device``: build on meta, shard, materialise, then initialise by name.

The model is constructed on the meta device (no memory), sharded with FSDP2, moved to real
memory with ``to_empty`` (each rank allocates only its shards), and each parameter is then
set from its full value keyed by global name (mm_train.param_init), so the result equals a plain
single-process init with the same values. At no point does a rank hold more than one full
parameter beyond its shards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from mm_train.fsdp2 import FSDP2Config, apply_fsdp2
from mm_train.param_init import FullValue, init_parameters_


def _meta_attributes(model: nn.Module) -> list[str]:
    """Names of tensors still on meta: plain tensor attributes that ``to_empty`` cannot see."""
    return [f"{prefix}.{key}" if prefix else key
            for prefix, module in model.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and value.is_meta]


def materialize_meta_model(model: nn.Module, device: torch.device | str, full_value: FullValue,
                           init_buffers: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Allocates a meta-device ``model`` (sharded or not) on ``device`` and initialises it.

    Each parameter is set from ``full_value(name, global shape)`` (see mm_train.param_init).
    Buffers cannot be re-derived generically, so a model with buffers needs
    ``init_buffers(model)`` to fill them (e.g. recompute rotary frequencies); without it a ValueError names the buffers. A tensor kept in a
    plain attribute and left on meta is reported too.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers and init_buffers is None:
        raise ValueError(f"init_buffers is required: the model has buffers {buffers} that to_empty leaves uninitialised")
    model.to_empty(device=device)
    init_parameters_(model, full_value)
    if init_buffers is not None:
        init_buffers(model)
    left_on_meta = _meta_attributes(model)
    if left_on_meta:
        raise ValueError(f"tensors {left_on_meta} are still on the meta device after materialisation: "
                         "register them as buffers and fill them in init_buffers")
    return model


def build_fsdp2_model_on_meta(build_model: Callable[[], nn.Module], config: FSDP2Config, full_value: FullValue,
                              device: torch.device | str, mesh: DeviceMesh | None = None,
                              init_buffers: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Builds ``build_model()`` on meta, shards it with :func:`apply_fsdp2`, then materialises it
    on ``device`` with :func:`materialize_meta_model`. Returns the sharded, initialised model."""
    with torch.device("meta"):
        model = build_model()
    apply_fsdp2(model, config, mesh)
    return materialize_meta_model(model, device, full_value, init_buffers)
