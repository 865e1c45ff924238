"""Flag checks done before any process group or model exists; each failure is one ConfigError line.

Also fills the Megatron-derived defaults (global batch size, ffn size, max positions) so the
rest of the trainer reads final values.
"""

from __future__ import annotations

import importlib.util

from mm_train.arguments import SCALE_OUT_FLAGS
from mm_train.context_parallel import check_context_parallel
from mm_train.environment import ConfigError, Launch, check_device_connections, process_group_timeout
from mm_train.fsdp2_training import validate_fsdp2_flags
from mm_train.moe import check_moe


def _refuse_scale_out(args) -> None:
    for name, off in SCALE_OUT_FLAGS:
        if getattr(args, name) != off:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is not yet supported by mm-train")


def _swiglu_ffn_default(hidden: int) -> int:
    return ((int(4 * hidden * 2 / 3) + 63) // 64) * 64


def _fill_defaults(args, data_parallel_size: int) -> None:
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = _swiglu_ffn_default(args.hidden_size) if args.swiglu else 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel_size
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False
    args.data_parallel_size = data_parallel_size


def _check_layout(args, world_size: int) -> int:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if tp < 1 or pp < 1 or cp < 1:
        raise ConfigError("--tensor-model-parallel-size, --pipeline-model-parallel-size and "
                          "--context-parallel-size must be >= 1")
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    if args.num_layers % pp:
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                          f"{args.num_attention_heads}")
    if args.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by TP {tp}")
    return world_size // (tp * pp * cp)


def _check_model(args) -> None:
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % args.num_query_groups:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                          f"--num-query-groups {args.num_query_groups}")
    if args.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {args.num_query_groups} is not divisible by TP {tp}")
    if args.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by TP {tp}")
    if args.seq_length > args.max_position_embeddings and args.position_embedding_type == "learned_absolute":
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                          f"{args.max_position_embeddings}")
    if args.use_fused_rmsnorm and args.normalization != "RMSNorm":
        raise ConfigError("--use-fused-rmsnorm needs --normalization RMSNorm")
    if args.use_fused_swiglu and not args.swiglu:
        raise ConfigError("--use-fused-swiglu needs --swiglu")
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")


def _check_training(args) -> None:
    dp = args.data_parallel_size
    if args.micro_batch_size < 1:
        raise ConfigError("--micro-batch-size must be >= 1")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by micro batch size x "
                          f"data-parallel size = {args.micro_batch_size} x {dp}")
    if args.train_iters < 1:
        raise ConfigError("--train-iters must be >= 1")
    if args.calculate_per_sample_loss and args.calculate_per_token_loss:
        raise ConfigError("--calculate-per-sample-loss and --calculate-per-token-loss are mutually exclusive")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_warmup_fraction is not None:
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            raise ConfigError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
        if args.lr_warmup_iters:
            raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if args.clip_grad < 0:
        raise ConfigError(f"--clip-grad {args.clip_grad} must be >= 0 (0 disables clipping)")
    if args.lr_mult != 1.0 and not args.lr_scale_modules:
        raise ConfigError("--lr-mult needs --lr-scale-modules naming the parameters it scales")


def _check_parallel_features(args) -> None:
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce")
    if args.recompute_granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method (uniform|block) "
                              "and --recompute-num-layers")
        per_stage = args.num_layers // args.pipeline_model_parallel_size
        if not 1 <= args.recompute_num_layers <= per_stage:
            raise ConfigError(f"--recompute-num-layers {args.recompute_num_layers} must be in [1, {per_stage}] "
                              "(layers per pipeline stage)")
    elif args.recompute_method is not None:
        raise ConfigError("--recompute-method is only used with --recompute-granularity full")


def _check_output(args) -> None:
    for name in ("log_interval", "save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")


def validate(args, launch: Launch) -> None:
    """Checks every flag against the others and the environment; fills derived defaults in place.

    Raises ConfigError with a one-line message on the first problem.
    """
    _refuse_scale_out(args)
    validate_fsdp2_flags(args, launch.world_size)
    data_parallel_size = _check_layout(args, launch.world_size)
    _fill_defaults(args, data_parallel_size)
    _check_model(args)
    check_context_parallel(args)
    _check_training(args)
    _check_parallel_features(args)
    check_moe(args, launch.world_size // args.pipeline_model_parallel_size)
    _check_output(args)
    check_device_connections(args, launch)
    process_group_timeout(args)
