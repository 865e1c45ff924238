"""The optimizer, its learning-rate and weight-decay schedule and MindSpeed-MM's parameter rules
(``--weight-decay-exclude-modules``, ``--lr-scale-modules`` with ``--lr-mult``): flags, checks and
:class:`OptimizerConfig`. :mod:`mm_train.optim` builds the optimizers and the schedule from it.

``--optimizer-selection`` (MindSpeed): ``fused_adamw`` and ``fused_torch_adamw`` are AdamW in the fused
implementation the device has: megatron-core's choice (Transformer Engine's or Apex's fused Adam, else
torch's AdamW) with megatron's optimizer, torch's fused AdamW under FSDP2 on an accelerator.
``fused_ema_adamw`` (AdamW keeping an average of the weights) is refused."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import (
    fields_from,
    non_negative,
    non_negative_int,
    positive,
    positive_int,
    probability_below_one,
    ranged,
)


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer (adam | sgd) and its hyper-parameters, the schedule (decay and warmup counted in
    iterations, or warmup as a fraction of the decay span), gradient clipping (0: off) and the
    name keywords of the parameter rules."""

    optimizer: str
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: int | None
    lr_warmup_fraction: float | None
    lr_warmup_iters: int
    lr_warmup_init: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    sgd_momentum: float
    clip_grad: float
    weight_decay_exclude_modules: tuple[str, ...]
    lr_scale_modules: tuple[str, ...]
    lr_mult: float
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    optimizer_selection: str = "fused_adamw"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the optimizer, schedule, clipping and parameter-rule flags."""
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    group.add_argument("--optimizer-selection", default="fused_adamw",
                       choices=["fused_adamw", "fused_torch_adamw", "fused_ema_adamw"],
                       help="AdamW's implementation: the device's fused one (MindSpeed's names)")
    group.add_argument("--lr", type=non_negative, default=1e-4)
    group.add_argument("--min-lr", type=non_negative, default=0.0)
    group.add_argument("--lr-decay-style", default="linear",
                       choices=["constant", "linear", "cosine", "inverse-square-root"])
    group.add_argument("--lr-decay-iters", type=positive_int, default=None, help="default: --train-iters")
    group.add_argument("--lr-warmup-fraction", type=probability_below_one, default=None)
    group.add_argument("--lr-warmup-iters", type=non_negative_int, default=0)
    group.add_argument("--lr-warmup-init", type=non_negative, default=0.0)
    group.add_argument("--weight-decay", type=non_negative, default=0.01)
    group.add_argument("--adam-beta1", type=probability_below_one, default=0.9)
    group.add_argument("--adam-beta2", type=probability_below_one, default=0.999)
    group.add_argument("--adam-eps", type=positive, default=1e-8)
    group.add_argument("--sgd-momentum", type=ranged(float, 0, 1), default=0.9)
    group.add_argument("--clip-grad", type=non_negative, default=1.0, help="global L2 norm; 0 disables")
    group.add_argument("--weight-decay-exclude-modules", nargs="+", default=[],
                       help="no weight decay for parameters whose name contains one of these (case-insensitive)")
    group.add_argument("--lr-scale-modules", nargs="+", default=[],
                       help="parameters whose name contains one of these (case-insensitive) use lr x --lr-mult")
    group.add_argument("--lr-mult", type=non_negative, default=1.0)
    group.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                       dest="override_opt_param_scheduler", action="store_true",
                       help="on resume, use this run's schedule flags, not the checkpoint's")
    group.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                       dest="use_checkpoint_opt_param_scheduler", action="store_true",
                       help="on resume, keep the checkpoint's schedule, whatever this run's flags say")


def check(args: argparse.Namespace) -> None:
    """Learning rates out of order, warmup given twice, a multiplier without the parameters it scales,
    both schedule choices on resume (the ranges of single flags are their argparse types)."""
    if args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise ConfigError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
    if args.lr_mult != 1.0 and not args.lr_scale_modules:
        raise ConfigError("--lr-mult needs --lr-scale-modules naming the parameters it scales")
    if args.optimizer_selection == "fused_ema_adamw":
        raise ConfigError("--optimizer-selection fused_ema_adamw: AdamW with an average of the weights is not built in "
                          "mm-train (use fused_adamw or fused_torch_adamw)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                          "exclusive")


def to_config(args: argparse.Namespace) -> OptimizerConfig:
    """The :class:`OptimizerConfig` of the (checked) flags."""
    return fields_from(OptimizerConfig, args,
                       weight_decay_exclude_modules=tuple(args.weight_decay_exclude_modules),
                       lr_scale_modules=tuple(args.lr_scale_modules))
