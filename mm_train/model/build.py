"""The GPT model: megatron-core's GPTModel, built from megatron-core's decoder block spec.

The block spec (:func:`block_spec`: megatron-core's dense and MoE layers per --moe-layer-freq, the
layers of this pipeline stage or virtual stage) is where the features go in: the core attention (the
fused one with --use-flash-attn, :mod:`mm_train.features.fused_kernels`; the context-parallel one,
:mod:`mm_train.features.context_parallel`, with CP) and, with the local layers, the norm of every
layer and of the final layer: mm_kernels' fused RMSNorm with --use-fused-rmsnorm
(:mod:`mm_train.features.fused_kernels`), else :class:`TorchNorm`. With --transformer-impl
transformer_engine the Transformer Engine spec keeps its own fused attention and norms. Parameters
are initialised by :mod:`mm_train.model.init`, the same for every parallel layout.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from mm_kernels.integrations.megatron import swap_spec_module
from mm_train.config import RunConfig
from mm_train.features import fused_kernels, moe
from mm_train.features.context_parallel import (
    ContextParallel,
    context_parallel_layer_spec,
    use_global_rope_positions,
)
from mm_train.model.init import initialize


class TorchNorm:
    """megatron-core's torch norm (LayerNorm or RMSNorm per ``config.normalization``) that also runs
    under sequence parallelism: megatron's WrappedTorchNorm refuses it, although the norm itself is
    per token; its parameters are marked ``sequence_parallel`` so megatron all-reduces their gradients
    over TP."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        serial = config
        if config.sequence_parallel:
            serial = copy.copy(config)
            serial.sequence_parallel = False
        norm = WrappedTorchNorm(serial, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def transformer_config(config: RunConfig) -> TransformerConfig:
    """megatron-core TransformerConfig of the run."""
    model, precision, parallel = config.model, config.precision, config.parallel
    dtype = precision.params_dtype
    transformer = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        bias_activation_fusion=config.fused_kernels.swiglu,
        add_bias_linear=not model.disable_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        perform_initialization=True,  # megatron sets the TP attributes only when it initialises
        use_cpu_initialization=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        context_parallel_size=config.context_parallel.size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.bf16,
        fp16=precision.fp16,
        attention_softmax_in_fp32=precision.attention_softmax_in_fp32,
        calculate_per_token_loss=config.training.loss_mode == "per_token",
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        deallocate_pipeline_outputs=True,
        batch_p2p_comm=False,
        cuda_graph_scope=[],
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **config.recompute.transformer_config_kwargs(),
        **moe.transformer_config_kwargs(config.moe),
    )
    # Set after construction: TransformerConfig's checks refuse variable lengths with the default MoE
    # dispatcher even for dense models. The pipeline schedule reads it to exchange tensor shapes.
    transformer.variable_seq_lengths = config.data.variable_seq_lengths
    return transformer


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Vocabulary padded up to a multiple of --make-vocab-size-divisible-by x TP (Megatron's rule)."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def block_spec(config: RunConfig, transformer: TransformerConfig, context_parallel: ContextParallel | None,
               vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """megatron-core's decoder block spec of this (virtual) pipeline stage, with the features' modules in."""
    model = config.model
    local = model.transformer_impl == "local"
    block = get_gpt_decoder_block_spec(transformer, use_transformer_engine=not local, normalization=model.normalization,
                                       vp_stage=vp_stage)
    if local:
        norm = fused_kernels.norm_module(config.fused_kernels) or TorchNorm
        block = dataclasses.replace(swap_spec_module(block, WrappedTorchNorm, norm), layer_norm=norm)
    layers = [fused_kernels.attention_layer_spec(layer, config.fused_kernels) for layer in block.layer_specs]
    return dataclasses.replace(block, layer_specs=[context_parallel_layer_spec(layer, context_parallel)
                                                   for layer in layers])


def build_model(config: RunConfig, transformer: TransformerConfig, vocab_size: int,
                context_parallel: ContextParallel | None = None, init: bool = True,
                vp_stage: int | None = None) -> GPTModel:
    """This rank's GPTModel stage (virtual stage ``vp_stage`` with the interleaved schedule), on the host,
    with pre/post-processing by pipeline position, initialised by :func:`mm_train.model.init.initialize`
    unless ``init`` is False (a model built on the meta device, set later, or --no-initialization); with
    ``context_parallel``, its attention and rotary embedding work on CP-sharded sequences."""
    model = config.model
    gpt = GPTModel(
        config=transformer,
        transformer_layer_spec=block_spec(config, transformer, context_parallel, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    use_global_rope_positions(gpt, context_parallel)
    if init:
        initialize(gpt, config.training.seed, transformer)
    return gpt


def to_device(gpt: GPTModel, device: torch.device) -> GPTModel:
    """Moves a GPTModel built on the host to ``device``, with the rotary frequencies megatron-core keeps
    in a plain attribute (``to`` does not move it)."""
    gpt.to(device)
    rotary = getattr(gpt, "rotary_pos_emb", None)
    rotary = getattr(rotary, "rotary", rotary)  # the context-parallel wrapper holds megatron's embedding
    if rotary is not None and isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        rotary.inv_freq = rotary.inv_freq.to(device)
    return gpt
