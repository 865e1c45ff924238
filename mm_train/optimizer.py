"""Megatron optimizer with MindSpeed-MM's parameter-level weight-decay and learning-rate rules.

- ``--weight-decay-exclude-modules A B``: parameters whose name contains A or B
  (case-insensitive substring) get wd_mult 0, as do biases and 1-D parameters (Megatron's rule).
- ``--lr-scale-modules A B`` with ``--lr-mult m``: matching parameters get lr_mult m.
Parameters are grouped by (wd_mult, lr_mult); the scheduler (mm_train.scheduler) applies
lr x lr_mult and wd x wd_mult. The optimizer is megatron-core's (Adam with decoupled weight
decay, or SGD), optionally the distributed optimizer, clipping by global L2 norm when
--clip-grad > 0.
"""

from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from mm_train.model import params_dtype


def name_matches(name: str, keywords: list[str]) -> bool:
    """Case-insensitive substring match of a parameter name against any keyword."""
    lowered = name.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def param_group_overrides(args) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron config overrides giving wd_mult 0 and lr_mult --lr-mult to the matching parameters."""
    exclude = list(args.weight_decay_exclude_modules)
    no_decay = ParamWithNamePredicate(
        name="no_weight_decay",
        fn=lambda param, name: param.dim() == 1 or name.endswith(".bias") or name_matches(name, exclude))
    overrides = {ParamKey(with_name_predicate=no_decay): ParamGroupOverride(wd_mult=0.0)}
    if args.lr_scale_modules and args.lr_mult != 1.0:
        scaled = list(args.lr_scale_modules)
        lr_scaled = ParamWithNamePredicate(name="lr_scaled", fn=lambda param, name: name_matches(name, scaled))
        overrides[ParamKey(with_name_predicate=lr_scaled)] = ParamGroupOverride(lr_mult=args.lr_mult)
    return overrides


def optimizer_config(args) -> OptimizerConfig:
    """megatron-core OptimizerConfig from the arguments."""
    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=params_dtype(args), use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )


def build_optimizer(args, model_chunks: list):
    """The Megatron optimizer over the DDP-wrapped model chunks."""
    return get_megatron_optimizer(optimizer_config(args), model_chunks, config_overrides=param_group_overrides(args))
