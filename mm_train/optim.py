"""Optimizers and their schedule, with MindSpeed-MM's parameter-level weight-decay and learning-rate rules.

- ``--weight-decay-exclude-modules A B``: parameters whose name contains A or B
  (case-insensitive substring) get wd_mult 0, as do biases and 1-D parameters (Megatron's rule).
- ``--lr-scale-modules A B`` with ``--lr-mult m``: matching parameters get lr_mult m.

Parameters are grouped by (wd_mult, lr_mult). The optimizer is megatron-core's (Adam with decoupled
weight decay, or SGD), optionally the distributed optimizer, clipping by global L2 norm when
--clip-grad > 0; under FSDP2 the same groups feed a torch optimizer.

The schedule counts samples, as Megatron does. Warmup: ``--lr-warmup-fraction`` of the decay span
(or ``--lr-warmup-iters``), linear from ``--lr-warmup-init`` (0); then ``--lr-decay-style`` (cosine,
linear, ...) down to ``--min-lr`` at ``--lr-decay-iters`` (default ``--train-iters``). Every param
group gets lr x lr_mult and wd x wd_mult (megatron-core 0.16's scheduler applies only wd_mult).

On resume the checkpoint's schedule must equal the run's, unless ``--override-opt_param-scheduler``
(the run's wins) or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint's wins), as in Megatron;
a difference is a :class:`mm_train.errors.CheckpointError` naming the flag that changed.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from mm_train.errors import CheckpointError
from mm_train.features import flag
from mm_train.features.optimizer import OptimizerConfig
from mm_train.features.parallel import ParallelConfig
from mm_train.features.precision import PrecisionConfig
from mm_train.features.training import TrainingConfig


def name_matches(name: str, keywords: tuple[str, ...] | list[str]) -> bool:
    """Case-insensitive substring match of a parameter name against any keyword."""
    lowered = name.lower()
    return any(keyword.lower() in lowered for keyword in keywords)


def no_weight_decay(param: torch.Tensor, name: str, exclude: tuple[str, ...]) -> bool:
    """Megatron's rule (biases and 1-D parameters) plus --weight-decay-exclude-modules keywords."""
    return param.dim() == 1 or name.endswith(".bias") or name_matches(name, exclude)


def param_group_overrides(config: OptimizerConfig) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron config overrides giving wd_mult 0 and lr_mult --lr-mult to the matching parameters."""
    exclude = config.weight_decay_exclude_modules
    no_decay = ParamWithNamePredicate(
        name="no_weight_decay", fn=lambda param, name: no_weight_decay(param, name, exclude))
    overrides = {ParamKey(with_name_predicate=no_decay): ParamGroupOverride(wd_mult=0.0)}
    if config.lr_scale_modules and config.lr_mult != 1.0:
        scaled = config.lr_scale_modules
        lr_scaled = ParamWithNamePredicate(name="lr_scaled", fn=lambda param, name: name_matches(name, scaled))
        overrides[ParamKey(with_name_predicate=lr_scaled)] = ParamGroupOverride(lr_mult=config.lr_mult)
    return overrides


def build_megatron_optimizer(config: OptimizerConfig, precision: PrecisionConfig, parallel: ParallelConfig,
                             model_chunks: list):
    """megatron-core's optimizer over the DDP-wrapped model chunks (the distributed optimizer with
    --use-distributed-optimizer; with --fp16, megatron's dynamic grad scaler)."""
    megatron_config = MegatronOptimizerConfig(
        optimizer=config.optimizer, lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_eps=config.adam_eps,
        sgd_momentum=config.sgd_momentum, clip_grad=config.clip_grad, bf16=precision.bf16, fp16=precision.fp16,
        initial_loss_scale=precision.initial_loss_scale, min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window, hysteresis=precision.hysteresis,
        params_dtype=precision.params_dtype, use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(megatron_config, model_chunks, config_overrides=param_group_overrides(config))


def torch_param_groups(config: OptimizerConfig, named_parameters) -> list[dict]:
    """Param groups for a torch optimizer, keyed by (wd_mult, lr_mult) with the rules above, carrying
    the keys the scheduler reads (wd_mult, lr_mult, max_lr, min_lr). ``named_parameters`` yields
    (global name, parameter); parameters that need no gradient are left out."""
    exclude, scaled = config.weight_decay_exclude_modules, config.lr_scale_modules
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        wd_mult = 0.0 if no_weight_decay(param, name, exclude) else 1.0
        lr_mult = config.lr_mult if scaled and name_matches(name, scaled) else 1.0
        groups.setdefault((wd_mult, lr_mult), []).append(param)
    return [{"params": params, "wd_mult": wd_mult, "lr_mult": lr_mult, "max_lr": config.lr, "min_lr": config.min_lr}
            for (wd_mult, lr_mult), params in groups.items()]


# Devices with torch's fused AdamW kernel: one call per step instead of one per parameter and operation,
# which matters most for DTensor parameters.
_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def build_torch_optimizer(config: OptimizerConfig, named_parameters, device_type: str) -> torch.optim.Optimizer:
    """torch AdamW (Adam with decoupled weight decay, as megatron-core uses without Apex/TE) or SGD
    over :func:`torch_param_groups` for parameters on ``device_type``; the scheduler sets every group's
    lr and weight decay. AdamW runs its fused kernel where torch has one, SGD its multi-tensor one."""
    fused = device_type in _FUSED_ADAMW_DEVICES
    groups = torch_param_groups(config, named_parameters)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.sgd_momentum,
                               foreach=fused or None)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused or None)


# Each value megatron's scheduler compares on load, and the flags it is made of.
_SCHEDULE_SOURCES = {
    "max_lr": ("lr",),
    "min_lr": ("min_lr",),
    "lr_warmup_steps": ("lr_warmup_fraction", "lr_warmup_iters", "lr_decay_iters", "train_iters", "global_batch_size"),
    "lr_decay_steps": ("lr_decay_iters", "train_iters", "global_batch_size"),
    "lr_decay_style": ("lr_decay_style",),
    "start_wd": ("weight_decay",),
    "end_wd": ("weight_decay",),
    "wd_incr_steps": ("train_iters", "global_batch_size"),
    "wd_incr_style": (),
}


class ScaledParamScheduler(OptimizerParamScheduler):
    """OptimizerParamScheduler that also multiplies each group's lr by its ``lr_mult``, and keeps the
    flags its schedule is made of (``flags``, saved in its state) to name the one that changed when a
    checkpoint's schedule differs."""

    def __init__(self, *args, flags: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.flags = flags or {}

    def state_dict(self) -> dict:
        """megatron's state, plus the schedule's flags."""
        return {**super().state_dict(), "flags": dict(self.flags)}

    def load_state_dict(self, state_dict: dict) -> None:
        """megatron's load (override / use-checkpoint semantics); without either choice, a schedule that
        differs from this run's raises CheckpointError (megatron asserts) before anything is set."""
        if not (self.override_opt_param_scheduler or self.use_checkpoint_opt_param_scheduler):
            self._check_same_schedule(state_dict)
        super().load_state_dict(state_dict)

    def _check_same_schedule(self, saved: dict) -> None:
        mine, saved_flags = super().state_dict(), saved.get("flags", {})
        for key, sources in _SCHEDULE_SOURCES.items():
            if key not in saved or saved[key] == mine[key]:
                continue
            changed = [f"{flag(name)} {saved_flags[name]} in the checkpoint, {self.flags.get(name)} now"
                       for name in sources if name in saved_flags and saved_flags[name] != self.flags.get(name)]
            raise CheckpointError(
                f"this run's learning-rate schedule differs from the checkpoint's: "
                f"{'; '.join(changed) or 'its flags'} ({key} {saved[key]} vs {mine[key]}); add "
                "--override-opt_param-scheduler to use this run's schedule or --use-checkpoint-opt_param-scheduler "
                "to keep the checkpoint's")

    def step(self, increment: int) -> None:
        """Advances by ``increment`` samples and sets lr and weight decay of every param group."""
        super().step(increment)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)


def _decay_samples(config: OptimizerConfig, training: TrainingConfig) -> int:
    return (config.lr_decay_iters or training.train_iters) * training.global_batch_size


def warmup_samples(config: OptimizerConfig, training: TrainingConfig) -> int:
    """Warmup length in samples: fraction x decay span, or --lr-warmup-iters x global batch."""
    if config.lr_warmup_fraction is not None:
        return int(config.lr_warmup_fraction * _decay_samples(config, training))
    return config.lr_warmup_iters * training.global_batch_size


def build_scheduler(config: OptimizerConfig, training: TrainingConfig, optimizer) -> ScaledParamScheduler:
    """The schedule over samples for ``optimizer`` (see the module doc); weight decay is constant."""
    return ScaledParamScheduler(
        optimizer,
        init_lr=config.lr_warmup_init,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=warmup_samples(config, training),
        lr_decay_steps=_decay_samples(config, training),
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=training.train_iters * training.global_batch_size,
        wd_incr_style="constant",
        override_opt_param_scheduler=config.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=config.use_checkpoint_opt_param_scheduler,
        flags={"lr": config.lr, "min_lr": config.min_lr, "lr_decay_style": config.lr_decay_style,
               "lr_decay_iters": config.lr_decay_iters, "lr_warmup_fraction": config.lr_warmup_fraction,
               "lr_warmup_iters": config.lr_warmup_iters, "weight_decay": config.weight_decay,
               "train_iters": training.train_iters, "global_batch_size": training.global_batch_size},
    )


def learning_rate(optimizer) -> float:
    """The schedule's learning rate (of a group with lr_mult 1, or the first group divided by its lr_mult)."""
    groups = optimizer.param_groups
    plain = [g for g in groups if g.get("lr_mult", 1.0) == 1.0]
    group = (plain or groups)[0]
    return group["lr"] / group.get("lr_mult", 1.0)
