"""Activation recomputation with megatron-core: ``--recompute-granularity full --recompute-method
uniform|block --recompute-num-layers N`` (and ``--distribute-saved-activations``), their checks and
:class:`RecomputeConfig`. Under FSDP2 the YAML's ``recompute_modules`` replaces these flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import fields_from, positive_int


@dataclass(frozen=True)
class RecomputeConfig:
    """megatron-core's recompute settings (all None: no recomputation)."""

    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    distribute_saved_activations: bool = False

    def transformer_config_kwargs(self) -> dict:
        """The TransformerConfig keyword arguments of these settings."""
        return {"recompute_granularity": self.recompute_granularity, "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers,
                "distribute_saved_activations": self.distribute_saved_activations}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the recompute flags."""
    group = parser.add_argument_group("recompute")
    group.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    group.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    group.add_argument("--recompute-num-layers", type=positive_int, default=None)
    group.add_argument("--distribute-saved-activations", action="store_true")


def check(args: argparse.Namespace) -> None:
    """Full recompute needs a method and a layer count within one pipeline stage; a method needs full."""
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


def to_config(args: argparse.Namespace) -> RecomputeConfig:
    """The :class:`RecomputeConfig` of the (checked) flags."""
    return fields_from(RecomputeConfig, args)
