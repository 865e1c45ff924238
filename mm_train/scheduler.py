"""Learning-rate and weight-decay schedule, counted in samples as Megatron does.

Warmup: ``--lr-warmup-fraction`` of the decay span (or ``--lr-warmup-iters``), linear from
``--lr-warmup-init`` (0); then ``--lr-decay-style`` (cosine, linear, ...) down to ``--min-lr``
at ``--lr-decay-iters`` (default ``--train-iters``). Every param group gets lr x lr_mult and
wd x wd_mult (megatron-core 0.16's scheduler applies only wd_mult).
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


class ScaledParamScheduler(OptimizerParamScheduler):
    """OptimizerParamScheduler that also multiplies each group's lr by its ``lr_mult``."""

    def step(self, increment: int) -> None:
        """Advances by ``increment`` samples and sets lr and weight decay of every param group."""
        super().step(increment)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_mult", 1.0)


def warmup_samples(args) -> int:
    """Warmup length in samples: fraction x decay span, or --lr-warmup-iters x global batch."""
    decay_samples = (args.lr_decay_iters or args.train_iters) * args.global_batch_size
    if args.lr_warmup_fraction is not None:
        return int(args.lr_warmup_fraction * decay_samples)
    return args.lr_warmup_iters * args.global_batch_size


def build_scheduler(args, optimizer) -> ScaledParamScheduler:
    """The schedule over samples for ``optimizer`` (see module doc); weight decay is constant."""
    return ScaledParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_samples(args),
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * args.global_batch_size,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )
