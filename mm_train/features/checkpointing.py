"""Checkpoints: ``--save``/``--load``, ``--save-interval``, ``--ckpt-format torch|torch_dcp``, what is
saved and loaded (``--no-save-optim``, ``--no-load-rng``, ``--finetune``, ...), their checks and
:class:`CheckpointConfig`. The formats live in :mod:`mm_train.checkpoint`; the engine picks its own."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import positive_int


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and what to save and load. ``save`` set enables saving (every ``save_interval``
    iterations, and at the end); ``finetune`` loads the weights only and starts at iteration 0."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    ckpt_format: str = "torch"
    save_optim: bool = True
    save_rng: bool = True
    load_optim: bool = True
    load_rng: bool = True
    finetune: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the checkpoint flags."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save", default=None, help="checkpoint directory; setting it enables saving")
    group.add_argument("--load", default=None)
    group.add_argument("--save-interval", type=positive_int, default=None)
    group.add_argument("--ckpt-format", default="torch", choices=["torch", "torch_dcp"])
    group.add_argument("--no-save-optim", action="store_true")
    group.add_argument("--no-save-rng", action="store_true")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument("--no-load-rng", action="store_true")
    group.add_argument("--finetune", action="store_true", help="load weights only, start at iteration 0")


def check(args: argparse.Namespace) -> None:
    """torch_dcp is FSDP2's format (FSDP2 refuses the torch format itself)."""
    if args.ckpt_format == "torch_dcp" and not args.use_torch_fsdp2:
        raise ConfigError("--ckpt-format torch_dcp needs --use-torch-fsdp2 (Megatron's optimizer saves with "
                          "--ckpt-format torch)")


def to_config(args: argparse.Namespace) -> CheckpointConfig:
    """The :class:`CheckpointConfig` of the (checked) flags."""
    return CheckpointConfig(save=args.save, load=args.load, save_interval=args.save_interval,
                            ckpt_format=args.ckpt_format, save_optim=not args.no_save_optim,
                            save_rng=not args.no_save_rng, load_optim=not args.no_load_optim,
                            load_rng=not args.no_load_rng, finetune=args.finetune)
