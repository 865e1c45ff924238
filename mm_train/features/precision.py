"""Mixed precision: ``--bf16`` / ``--fp16`` (parameters and compute in that dtype; megatron-core keeps
fp32 main parameters and gradients), their check and :class:`PrecisionConfig`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from mm_train.errors import ConfigError
from mm_train.features import fields_from


@dataclass(frozen=True)
class PrecisionConfig:
    """At most one of bf16 / fp16; neither means fp32 throughout."""

    bf16: bool = False
    fp16: bool = False

    @property
    def params_dtype(self) -> torch.dtype:
        """bf16 / fp16 / fp32."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --bf16 and --fp16."""
    group = parser.add_argument_group("precision")
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp16", action="store_true")


def check(args: argparse.Namespace) -> None:
    """--bf16 and --fp16 exclude each other."""
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive")


def to_config(args: argparse.Namespace) -> PrecisionConfig:
    """The :class:`PrecisionConfig` of the flags."""
    return fields_from(PrecisionConfig, args)
