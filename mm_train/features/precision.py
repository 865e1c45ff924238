"""Mixed precision: ``--bf16`` / ``--fp16`` (parameters and compute in that dtype; megatron-core keeps
fp32 main parameters and gradients) and fp16's dynamic loss scaling (``--initial-loss-scale``,
``--min-loss-scale``, ``--loss-scale-window``, ``--hysteresis``, Megatron's names and defaults), their
checks and :class:`PrecisionConfig`.

With --fp16 the loss is multiplied by the loss scale before the backward pass; an iteration whose
gradients overflow is skipped (no update, the schedule does not advance) and the scale halves once
``hysteresis`` overflows have been seen; after ``loss_scale_window`` iterations without one it
doubles. The loss-scale flags have no effect without --fp16.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mm_train.errors import ConfigError
from mm_train.features import fields_from, positive, positive_int, ranged


@dataclass(frozen=True)
class PrecisionConfig:
    """At most one of bf16 / fp16; neither means fp32 throughout. The loss-scale fields are
    megatron-core's dynamic grad scaler's (used with fp16 only)."""

    bf16: bool = False
    fp16: bool = False
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000.0
    hysteresis: int = 2

    @property
    def params_dtype(self) -> torch.dtype:
        """bf16 / fp16 / fp32."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --bf16, --fp16 and the loss-scale flags."""
    group = parser.add_argument_group("precision")
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--initial-loss-scale", type=positive, default=2.0**32,
                       help="fp16: the dynamic loss scale to start from")
    group.add_argument("--min-loss-scale", type=positive, default=1.0, help="fp16: the dynamic loss scale's floor")
    group.add_argument("--loss-scale-window", type=ranged(float, 1), default=1000.0,
                       help="fp16: iterations without overflow before the loss scale doubles")
    group.add_argument("--hysteresis", type=positive_int, default=2,
                       help="fp16: overflows before the loss scale halves")


def check(args: argparse.Namespace) -> None:
    """--bf16 and --fp16 exclude each other; the loss scale's floor is not above its start."""
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")
    if args.min_loss_scale > args.initial_loss_scale:
        raise ConfigError(f"--min-loss-scale {args.min_loss_scale} is larger than --initial-loss-scale "
                          f"{args.initial_loss_scale}")


def to_config(args: argparse.Namespace) -> PrecisionConfig:
    """The :class:`PrecisionConfig` of the flags."""
    return fields_from(PrecisionConfig, args)
