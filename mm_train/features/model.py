"""The GPT model's shape: Megatron's model flags (layers, widths, heads, positions, norm, activation,
biases, dropout, init, vocabulary padding, megatron-core's layer implementation), their defaults and
checks, and :class:`ModelConfig`.

``--transformer-impl transformer_engine`` builds megatron-core's Transformer Engine layer spec when
Transformer Engine is installed; otherwise (and with ``local``, the default as in MindSpeed) the local
spec, where mm_kernels' fused norm goes in. ``--no-initialization`` skips drawing the weights: they
come from ``--load``.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import (
    fields_from,
    flag,
    non_negative,
    positive,
    positive_int,
    probability_below_one,
    ranged,
)

_SIZES = ("num_layers", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    """The model flags with their defaults resolved (``num_query_groups`` = heads without
    --group-query-attention; ``ffn_hidden_size``, ``kv_channels`` and ``max_position_embeddings`` filled).
    ``padded_vocab_size``: the model's vocabulary when given (else the tokenizer's, padded);
    ``transformer_impl``: the layer spec built ("local" or "transformer_engine");
    ``initialization``: False with --no-initialization (the weights must come from a checkpoint)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    kv_channels: int
    num_query_groups: int
    seq_length: int
    max_position_embeddings: int
    position_embedding_type: str
    rotary_base: int
    rotary_percent: float
    normalization: str
    norm_epsilon: float
    swiglu: bool
    untie_embeddings_and_output_weights: bool
    disable_bias_linear: bool
    add_qkv_bias: bool
    init_method_std: float
    hidden_dropout: float
    attention_dropout: float
    make_vocab_size_divisible_by: int
    padded_vocab_size: int | None = None
    transformer_impl: str = "local"
    initialization: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the model flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--num-layers", type=positive_int, default=None, help="required (unless --mm-model)")
    group.add_argument("--hidden-size", type=positive_int, default=None, help="required (unless --mm-model)")
    group.add_argument("--ffn-hidden-size", type=positive_int, default=None,
                       help="default 4*hidden, or 8/3*hidden rounded up to 64 with --swiglu")
    group.add_argument("--num-attention-heads", type=positive_int, default=None, help="required (unless --mm-model)")
    group.add_argument("--kv-channels", type=positive_int, default=None)
    group.add_argument("--group-query-attention", action="store_true")
    group.add_argument("--num-query-groups", type=positive_int, default=1)
    group.add_argument("--seq-length", type=positive_int, default=None, help="required")
    group.add_argument("--max-position-embeddings", type=positive_int, default=None, help="default: --seq-length")
    group.add_argument("--position-embedding-type", default="learned_absolute",
                       choices=["learned_absolute", "rope", "none"])
    group.add_argument("--use-rotary-position-embeddings", action="store_true",
                       help="Megatron's older spelling of --position-embedding-type rope")
    group.add_argument("--rotary-base", type=positive_int, default=10000)
    group.add_argument("--rotary-percent", type=ranged(float, 0, 1, above=True), default=1.0)
    group.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    group.add_argument("--norm-epsilon", type=positive, default=1e-5)
    group.add_argument("--swiglu", action="store_true")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument("--disable-bias-linear", action="store_true")
    group.add_argument("--add-qkv-bias", action="store_true")
    group.add_argument("--init-method-std", type=non_negative, default=0.02)
    group.add_argument("--hidden-dropout", type=probability_below_one, default=0.1)
    group.add_argument("--attention-dropout", type=probability_below_one, default=0.1)
    group.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    group.add_argument("--padded-vocab-size", type=positive_int, default=None,
                       help="the model's vocabulary (default: the tokenizer's, padded to a multiple of "
                            "--make-vocab-size-divisible-by x TP)")
    group.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                       help="megatron-core's layer spec; transformer_engine needs Transformer Engine installed")
    group.add_argument("--no-initialization", dest="initialization", action="store_false",
                       help="do not draw the weights: they come from --load")


def _swiglu_ffn_default(hidden: int) -> int:
    return ((int(4 * hidden * 2 / 3) + 63) // 64) * 64


def check_required(args: argparse.Namespace) -> None:
    """The model-size flags a GPT needs (with --mm-model they come from the model config)."""
    needed = _SIZES if args.mm_model is None else ()
    missing = [flag(name) for name in (*needed, "seq_length") if vars(args)[name] is None]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)}")


def uses_transformer_engine(args: argparse.Namespace) -> bool:
    """--transformer-impl transformer_engine with Transformer Engine installed."""
    return args.transformer_impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is not None


def fill_defaults(args: argparse.Namespace) -> None:
    """Megatron's derived defaults: FFN width, channels per head, max positions, query groups = heads
    without GQA, rope for --use-rotary-position-embeddings."""
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = _swiglu_ffn_default(args.hidden_size) if args.swiglu else 4 * args.hidden_size
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads


def check(args: argparse.Namespace) -> None:
    """Head counts that do not divide, and a sequence longer than the learned position table."""
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                          f"{args.num_attention_heads}")
    if args.num_attention_heads % args.num_query_groups:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                          f"--num-query-groups {args.num_query_groups}")
    if args.seq_length > args.max_position_embeddings and args.position_embedding_type == "learned_absolute":
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                          f"{args.max_position_embeddings}")
    if args.padded_vocab_size is not None and args.padded_vocab_size % args.tensor_model_parallel_size:
        raise ConfigError(f"--padded-vocab-size {args.padded_vocab_size} is not divisible by TP "
                          f"{args.tensor_model_parallel_size}")
    if not args.initialization and not args.load:
        raise ConfigError("--no-initialization needs --load: the weights come from a checkpoint")
    if uses_transformer_engine(args) and args.moe_grouped_gemm:
        raise ConfigError("--transformer-impl transformer_engine with --moe-grouped-gemm is not yet supported by "
                          "mm-train")


def notices(args: argparse.Namespace) -> list[str]:
    """A line when --transformer-impl transformer_engine cannot be honoured (Transformer Engine missing)."""
    if args.transformer_impl == "transformer_engine" and not uses_transformer_engine(args):
        return ["--transformer-impl transformer_engine: Transformer Engine is not installed, megatron-core's local "
                "layers run"]
    return []


def to_config(args: argparse.Namespace) -> ModelConfig:
    """The :class:`ModelConfig` of the (defaulted, checked) flags."""
    return fields_from(ModelConfig, args,
                       transformer_impl="transformer_engine" if uses_transformer_engine(args) else "local")
