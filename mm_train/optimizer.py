"""Megatron optimizer with MindSpeed-MM's parameter-level weight-decay and learning-rate rules.

- ``--weight-decay-exclude-modules A B``: parameters whose name contains A or B
  (case-insensitive substring) get wd_mult 0, as do biases and 1-D parameters (Megatron's rule).
- ``--lr-scale-modules A B`` with ``--lr-mult m``: matching parameters get lr_mult m.
Parameters are grouped by (wd_mult, lr_mult); the scheduler (mm_train.scheduler) applies
lr x lr_mult and wd x wd_mult. The optimizer is megatron-core's (Adam with decoupled weight
decay, or SGD), optionally the distributed optimizer, clipping by global L2 norm when
--clip-grad > 0. Under FSDP2 the same groups feed a torch optimizer (:func:`torch_param_groups`,
:func:`build_torch_optimizer`).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from mm_train.model import params_dtype


def name_matches(name: str, keywords: list[str]) -> bool:
    """Case-insensitive substring match of a parameter name against any keyword."""
    lowered = name.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def no_weight_decay(param: torch.Tensor, name: str, exclude: list[str]) -> bool:
    """Megatron's rule (biases and 1-D parameters) plus --weight-decay-exclude-modules keywords."""
    return param.dim() == 1 or name.endswith(".bias") or name_matches(name, exclude)


def param_group_overrides(args) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron config overrides giving wd_mult 0 and lr_mult --lr-mult to the matching parameters."""
    exclude = list(args.weight_decay_exclude_modules)
    no_decay = ParamWithNamePredicate(
        name="no_weight_decay", fn=lambda param, name: no_weight_decay(param, name, exclude))
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


def torch_param_groups(args, named_parameters) -> list[dict]:
    """Param groups for a torch optimizer, keyed by (wd_mult, lr_mult) with the rules above, carrying
    the keys the scheduler reads (wd_mult, lr_mult, max_lr, min_lr). ``named_parameters`` yields
    (global name, parameter); parameters that need no gradient are left out."""
    exclude, scaled = list(args.weight_decay_exclude_modules), list(args.lr_scale_modules)
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        wd_mult = 0.0 if no_weight_decay(param, name, exclude) else 1.0
        lr_mult = args.lr_mult if scaled and name_matches(name, scaled) else 1.0
        groups.setdefault((wd_mult, lr_mult), []).append(param)
    return [{"params": params, "wd_mult": wd_mult, "lr_mult": lr_mult, "max_lr": args.lr, "min_lr": args.min_lr}
            for (wd_mult, lr_mult), params in groups.items()]


def build_torch_optimizer(args, named_parameters) -> torch.optim.Optimizer:
    """torch AdamW (Adam with decoupled weight decay, as megatron-core uses without Apex/TE) or SGD
    over :func:`torch_param_groups`; the scheduler sets every group's lr and weight decay."""
    groups = torch_param_groups(args, named_parameters)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, weight_decay=args.weight_decay, momentum=args.sgd_momentum)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
