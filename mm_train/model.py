"""The GPT model: megatron-core GPTModel with the local (non-Transformer-Engine) layer spec.

Initialisation does not depend on the parallel layout: every parameter is drawn in full from
a generator keyed by (seed, global parameter name), then the slice this rank holds is cut out
the way megatron-core partitions it (TP dim and stride, global layer numbers under PP). The
same seed therefore gives the same model for any TP/PP/DP, and runs at different layouts
agree step by step.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from mm_train import moe
from mm_train.context_parallel import ContextParallel, context_parallel_layer_spec, use_global_rope_positions

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_SCALED_INIT = (".self_attention.linear_proj.weight", ".linear_fc2.weight")  # dense MLP and experts


def params_dtype(args) -> torch.dtype:
    """bf16 / fp16 / fp32 from --bf16 / --fp16."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args) -> TransformerConfig:
    """megatron-core TransformerConfig from the parsed (and validated) arguments."""
    dtype = params_dtype(args)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        bias_activation_fusion=args.swiglu and args.use_fused_swiglu,
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        perform_initialization=True,  # megatron sets the TP attributes only when it initialises
        use_cpu_initialization=True,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        calculate_per_token_loss=args.calculate_per_token_loss,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        distribute_saved_activations=args.distribute_saved_activations,
        deallocate_pipeline_outputs=True,
        batch_p2p_comm=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **moe.moe_config(args),
    )
    # Set after construction: TransformerConfig's checks refuse variable lengths with the default MoE
    # dispatcher even for dense models. The pipeline schedule reads it to exchange tensor shapes.
    config.variable_seq_lengths = args.variable_seq_lengths
    return config


def padded_vocab_size(vocab_size: int, args) -> int:
    """Vocabulary padded up to a multiple of --make-vocab-size-divisible-by x TP (Megatron's rule)."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_model(args, config: TransformerConfig, vocab_size: int,
                context_parallel: ContextParallel | None = None, init: bool = True) -> GPTModel:
    """This rank's GPTModel stage (pre/post-processing by pipeline position), initialised by :func:`initialize`
    unless ``init`` is False (a model built on the meta device, set later); with ``context_parallel``, its
    attention and rotary embedding work on CP-sharded sequences."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=context_parallel_layer_spec(moe.layer_spec(args), context_parallel),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    use_global_rope_positions(model, context_parallel)
    if init:
        initialize(model, args.seed, config)
    return model


def global_name(model: GPTModel, name: str) -> str:
    """The name a parameter has in the full (TP=PP=1) model: global layer index; a tied output layer
    is the word embedding."""
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


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    """Shape of the whole parameter before tensor-parallel partitioning."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def draw_full(name: str, shape: list[int], seed: int, config: TransformerConfig) -> torch.Tensor:
    """The full fp32 value of parameter ``name``: norm weights 1, biases 0, projections into the
    residual stream N(0, std / sqrt(2 * layers)), other weights N(0, std)."""
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if "layernorm" in name or name.endswith("norm.weight"):
        return torch.ones(shape)
    std = config.init_method_std
    if name.endswith(_SCALED_INIT):
        std = std / math.sqrt(2.0 * config.num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of ``full``, cut as megatron-core partitions it (strided for the SwiGLU fc1)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)[tp_rank::tp_size]
    return torch.cat(pieces, dim=dim)


@torch.no_grad()
def initialize(model: GPTModel, seed: int, config: TransformerConfig) -> None:
    """Sets every parameter of this rank's stage from the layout-independent full model (see module doc)."""
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
