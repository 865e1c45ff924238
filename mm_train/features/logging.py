"""What the run reports: ``--log-interval`` (Megatron-LM's iteration line), ``--log-throughput`` (its
TFLOP/s per device), ``--log-tps`` (MindSpeed-MM's tokens per sample), ``--tensorboard-dir`` and
``--tensorboard-log-interval``, their checks, :class:`LoggingConfig`, and Megatron's FLOP count of an
iteration (:func:`num_floating_point_operations`). :mod:`mm_train.reporting` writes the lines and scalars."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import fields_from, positive_int
from mm_train.features.model import ModelConfig
from mm_train.features.moe import MoEConfig


@dataclass(frozen=True)
class LoggingConfig:
    """The iteration line every ``log_interval`` iterations (and after the first iteration of a run), with
    the throughput per device (``log_throughput``) and the tokens per sample (``log_tps``); TensorBoard
    scalars under ``tensorboard_dir`` (None: none) every ``tensorboard_log_interval`` iterations."""

    log_interval: int = 100
    log_throughput: bool = False
    log_tps: bool = False
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the logging flags."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=positive_int, default=100)
    group.add_argument("--log-throughput", action="store_true",
                       help="adds 'throughput per GPU (TFLOP/s/GPU)' (Megatron's FLOP count) to the iteration line")
    group.add_argument("--log-tps", action="store_true",
                       help="adds 'tokens per sample' (tokens in the loss per sample, MindSpeed-MM) to the iteration "
                            "line")
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--tensorboard-log-interval", type=positive_int, default=1)


def check(args: argparse.Namespace) -> None:
    """TensorBoard installed when asked for."""
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")


def to_config(args: argparse.Namespace) -> LoggingConfig:
    """The :class:`LoggingConfig` of the (checked) flags."""
    return fields_from(LoggingConfig, args)


def num_floating_point_operations(model: ModelConfig, moe: MoEConfig | None, padded_vocab_size: int,
                                  batch_size: int) -> float:
    """Megatron-LM's FLOP count of one iteration over ``batch_size`` sequences of --seq-length tokens
    (forward, weight and input gradients: 3 x 2 FLOPs per multiply-add), for a GPT with causal attention
    (half of the S x S scores), MHA or GQA, dense and MoE MLPs (routed top-k and shared experts) and the
    output logits."""
    forward_backward, multiply_add = 3, 2
    ffn_factor = 3 if model.swiglu else 2
    kv_channels = model.kv_channels
    query = kv_channels * model.num_attention_heads
    key_value = kv_channels * model.num_query_groups
    attention = forward_backward * multiply_add * (
        model.hidden_size * (query + 2 * key_value) + query * model.seq_length / 2 * 2 + query * model.hidden_size)
    if moe is None:
        dense_layers, moe_layers, routed, moe_ffn, shared_ffn = model.num_layers, 0, 0, 0, 0
    else:
        moe_layers = moe.num_moe_layers
        dense_layers = model.num_layers - moe_layers
        routed, moe_ffn = moe.moe_router_topk, moe.moe_ffn_hidden_size
        shared_ffn = moe.moe_shared_expert_intermediate_size or 0
    mlp = forward_backward * multiply_add * model.hidden_size * (
        model.ffn_hidden_size * ffn_factor * dense_layers
        + moe_ffn * routed * ffn_factor * moe_layers
        + shared_ffn * ffn_factor * moe_layers)
    logits = forward_backward * multiply_add * model.hidden_size * padded_vocab_size
    return float(batch_size * model.seq_length * (mlp + attention * model.num_layers + logits))
