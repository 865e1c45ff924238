"""Layout-independent initialisation: the same seed gives the same full model for any TP/PP/EP/DP or
FSDP2 layout, so runs at different layouts agree step by step.

Every parameter is drawn in full from a generator keyed by (seed, global parameter name)
(:func:`draw_full`), then the part this rank holds is cut out:

- megatron-core (:func:`initialize`): the slice megatron partitions to this rank (TP dim and stride,
  global layer numbers under PP, experts by global index under EP);
- any model, plain or FSDP2-sharded (:func:`init_parameters_`): a ``full_value(name, shape)``
  function; a DTensor shard keeps only its local slice, cut locally with no communication;
- a model built on the meta device (:func:`materialize_meta_model`): ``to_empty`` allocates only the
  shards, then :func:`init_parameters_`. No rank holds more than one full parameter beyond its shards.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mm_train.features import moe

FullValue = Callable[[str, torch.Size], torch.Tensor]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_SCALED_INIT = (".self_attention.linear_proj.weight", ".linear_fc2.weight")  # dense MLP and experts


def global_name(model: nn.Module, name: str) -> str:
    """The name a GPTModel parameter has in the full (TP=PP=1) model: global layer index; a tied output
    layer is the word embedding."""
    match = _LAYER.match(name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        return f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def keyed_normal(shape: list[int], std: float, seed: int, name: str) -> torch.Tensor:
    """fp32 N(0, std) of ``shape`` drawn from a generator keyed by (seed, name): the same values in
    every process and layout."""
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    """Shape of the whole parameter before tensor-parallel partitioning."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def draw_full(name: str, shape: list[int], seed: int, config: TransformerConfig) -> torch.Tensor:
    """The full fp32 value of parameter ``name``: norm weights 1 (also Transformer Engine's norms fused
    into a linear layer, ``layer_norm_weight``), biases 0, projections into the residual stream
    N(0, std / sqrt(2 * layers)), other weights N(0, std)."""
    if name.endswith((".bias", "layer_norm_bias")):
        return torch.zeros(shape)
    if "layernorm" in name or name.endswith(("norm.weight", "layer_norm_weight")):
        return torch.ones(shape)
    std = config.init_method_std
    if name.endswith(_SCALED_INIT):
        std = std / math.sqrt(2.0 * config.num_layers)
    return keyed_normal(shape, std, seed, name)


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of ``full``, cut as megatron-core partitions it (strided for the SwiGLU fc1)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)[tp_rank::tp_size]
    return torch.cat(pieces, dim=dim)


@torch.no_grad()
def initialize(model: nn.Module, seed: int, config: TransformerConfig) -> None:
    """Sets every parameter of this rank's megatron-core module (a GPTModel stage, or any module whose
    names follow its layout) from the layout-independent full model (see the module doc)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, param in model.named_parameters():
        if moe.is_expert_parameter(name):  # expert TP is 1: experts are whole on their EP rank
            num_local = config.num_moe_experts // config.expert_model_parallel_size
            param.copy_(moe.expert_full_value(global_name(model, name), param, num_local, config.hidden_size,
                                              lambda key, shape: draw_full(key, shape, seed, config)))
            continue
        full = draw_full(global_name(model, name), full_shape(param, tp_size), seed, config)
        param.copy_(tp_slice(full, param, tp_rank, tp_size))


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


def _meta_attributes(model: nn.Module) -> list[str]:
    """Names of tensors still on meta: plain tensor attributes that ``to_empty`` cannot see."""
    return [f"{prefix}.{key}" if prefix else key
            for prefix, module in model.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and value.is_meta]


def materialize_meta_model(model: nn.Module, device: torch.device | str, full_value: FullValue,
                           init_buffers: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Allocates a meta-device ``model`` (sharded or not) on ``device`` and initialises it.

    Each parameter is set from ``full_value(name, global shape)`` (:func:`init_parameters_`).
    Buffers cannot be re-derived generically, so a model with buffers needs ``init_buffers(model)``
    to fill them (e.g. recompute rotary frequencies); without it a ValueError names the buffers.
    A tensor kept in a plain attribute and left on meta is reported too.
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
