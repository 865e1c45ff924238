"""What the run reports: ``--log-interval`` (Megatron's iteration line), ``--tensorboard-dir`` and
``--tensorboard-log-interval``, their checks and :class:`LoggingConfig`. :mod:`mm_train.reporting`
writes the lines and scalars."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import fields_from, positive_int


@dataclass(frozen=True)
class LoggingConfig:
    """The iteration line every ``log_interval`` iterations; TensorBoard scalars under
    ``tensorboard_dir`` (None: none) every ``tensorboard_log_interval`` iterations."""

    log_interval: int = 100
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the logging flags."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=positive_int, default=100)
    group.add_argument("--tensorboard-dir", default=None)
    group.add_argument("--tensorboard-log-interval", type=positive_int, default=1)


def check(args: argparse.Namespace) -> None:
    """TensorBoard installed when asked for."""
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)")


def to_config(args: argparse.Namespace) -> LoggingConfig:
    """The :class:`LoggingConfig` of the (checked) flags."""
    return fields_from(LoggingConfig, args)
