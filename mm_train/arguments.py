"""The command line: Megatron's model/training flags plus MindSpeed-MM's GPT_ARGS and OUTPUT_ARGS.

Flags keep Megatron's names and defaults (argparse turns ``--seq-length`` into
``args.seq_length``), so MindSpeed-MM launch scripts run unchanged. Three kinds of flag
exist besides the working ones:

- :data:`INACTIVE_FLAGS`: accepted for compatibility and without effect here (e.g.
  ``--use-mcore-models``: the model is always megatron-core's); listed once at start-up.
- :data:`SCALE_OUT_FLAGS`: parsed, then refused as not yet supported (virtual pipeline
  stages, the --mm-* configuration files).
- data and tokenizer flags, added by :func:`mm_train.data.add_data_args`; context-parallel
  flags, added by :func:`mm_train.context_parallel.add_context_parallel_args`; mixture-of-experts
  flags, added by :func:`mm_train.moe.add_moe_args`.
"""

from __future__ import annotations

import argparse

from mm_train.context_parallel import add_context_parallel_args
from mm_train.data import add_data_args
from mm_train.moe import add_moe_args

# Flags accepted so that MindSpeed-MM scripts run, with no effect on this trainer.
INACTIVE_FLAGS = (
    "use_mcore_models",
    "no_gradient_accumulation_fusion",
    "no_masked_softmax_fusion",
    "no_bias_dropout_fusion",
    "no_bias_swiglu_fusion",
    "no_rope_fusion",
    "attention_softmax_in_fp32",
    "use_flash_attn",
    "use_fused_rotary_pos_emb",
    "reuse_fp32_param",
    "enable_one_logger",
    "log_throughput",
)

# Flags of the scale-out features: (attribute, value meaning "off").
SCALE_OUT_FLAGS = (
    ("num_layers_per_virtual_pipeline_stage", None),
    ("mm_data", None),
    ("mm_model", None),
    ("mm_tool", None),
)


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--num-layers", type=int, required=True)
    group.add_argument("--hidden-size", type=int, required=True)
    group.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="default 4*hidden, or 8/3*hidden rounded up to 64 with --swiglu")
    group.add_argument("--num-attention-heads", type=int, required=True)
    group.add_argument("--kv-channels", type=int, default=None)
    group.add_argument("--group-query-attention", action="store_true")
    group.add_argument("--num-query-groups", type=int, default=1)
    group.add_argument("--seq-length", type=int, required=True)
    group.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    group.add_argument("--position-embedding-type", default="learned_absolute",
                       choices=["learned_absolute", "rope", "none"])
    group.add_argument("--rotary-base", type=int, default=10000)
    group.add_argument("--rotary-percent", type=float, default=1.0)
    group.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    group.add_argument("--norm-epsilon", type=float, default=1e-5)
    group.add_argument("--swiglu", action="store_true")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument("--disable-bias-linear", action="store_true")
    group.add_argument("--add-qkv-bias", action="store_true")
    group.add_argument("--init-method-std", type=float, default=0.02)
    group.add_argument("--hidden-dropout", type=float, default=0.1)
    group.add_argument("--attention-dropout", type=float, default=0.1)
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def _training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, default=1)
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="default: micro batch size x data-parallel size")
    group.add_argument("--train-iters", type=int, default=100)
    group.add_argument("--exit-interval", type=int, default=None)
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    group.add_argument("--lr", type=float, default=1e-4)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument("--lr-decay-style", default="linear",
                       choices=["constant", "linear", "cosine", "inverse-square-root"])
    group.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    group.add_argument("--lr-warmup-fraction", type=float, default=None)
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-warmup-init", type=float, default=0.0)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.999)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--sgd-momentum", type=float, default=0.9)
    group.add_argument("--clip-grad", type=float, default=1.0, help="global L2 norm; 0 disables")
    group.add_argument("--weight-decay-exclude-modules", nargs="+", default=[],
                       help="no weight decay for parameters whose name contains one of these (case-insensitive)")
    group.add_argument("--lr-scale-modules", nargs="+", default=[],
                       help="parameters whose name contains one of these (case-insensitive) use lr x --lr-mult")
    group.add_argument("--lr-mult", type=float, default=1.0)
    group.add_argument("--calculate-per-sample-loss", action="store_true")
    group.add_argument("--calculate-per-token-loss", action="store_true")
    group.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    group.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    group.add_argument("--recompute-num-layers", type=int, default=None)
    group.add_argument("--distribute-saved-activations", action="store_true")


def _parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--overlap-param-gather", action="store_true")
    group.add_argument("--ddp-bucket-size", type=int, default=None,
                       help="gradient bucket size in elements (default: megatron-core's)")
    group.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo", "hccl"],
                       help="default: hccl on NPU, nccl on CUDA, gloo on CPU")
    group.add_argument("--distributed-timeout-minutes", type=int, default=10)
    group.add_argument("--use-fused-rmsnorm", action="store_true")
    group.add_argument("--use-fused-swiglu", action="store_true")


def _output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--log-interval", type=int, default=100)
    group.add_argument("--save", default=None, help="checkpoint directory; setting it enables saving")
    group.add_argument("--load", default=None)
    group.add_argument("--save-interval", type=int, default=None)
    group.add_argument("--eval-interval", type=int, default=1000)
    group.add_argument("--eval-iters", type=int, default=100)
    group.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dcp"])
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--no-save-rng", action="store_true")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--finetune", action="store_true", help="load weights only, start at iteration 0")
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--tensorboard-log-interval", type=int, default=1)


def _fsdp2_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FSDP2")
    group.add_argument("--use-torch-fsdp2", action="store_true",
                       help="shard parameters, gradients and optimizer state with torch FSDP2 over all ranks")
    group.add_argument("--fsdp2-config-path", default=None, help="FSDP2 settings (YAML)")
    group.add_argument("--use-cpu-initialization", action="store_true",
                       help="build and initialise the model in host memory (required by --use-torch-fsdp2)")
    group.add_argument("--init-model-with-meta-device", action="store_true",
                       help="build on the meta device, shard, then allocate and initialise only the shards")


def _inactive_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("accepted for compatibility (no effect here)")
    for name in INACTIVE_FLAGS:
        group.add_argument("--" + name.replace("_", "-"), action="store_true")


def _scale_out_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out features (parsed, not yet supported)")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    group.add_argument("--mm-data", default=None)
    group.add_argument("--mm-model", default=None)
    group.add_argument("--mm-tool", default=None)


def build_parser() -> argparse.ArgumentParser:
    """The full mm-train argument parser."""
    parser = argparse.ArgumentParser(
        prog="mm-train", description="Megatron-core GPT training with MindSpeed-MM style flags.",
        allow_abbrev=False)
    _model_args(parser)
    _training_args(parser)
    _parallel_args(parser)
    _output_args(parser)
    add_data_args(parser)
    _fsdp2_args(parser)
    add_context_parallel_args(parser)
    add_moe_args(parser)
    _inactive_args(parser)
    _scale_out_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default sys.argv[1:]); unknown flags or bad values exit with argparse's usage error."""
    return build_parser().parse_args(argv)
