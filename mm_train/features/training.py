"""The iteration schedule: batch sizes, iterations, evaluation cadence, seed and the loss
normalisation (``--calculate-per-sample-loss`` / ``--calculate-per-token-loss``, see
:mod:`mm_train.loss`), their checks and :class:`TrainingConfig`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import fields_from, non_negative_int, positive_int, ranged


@dataclass(frozen=True)
class TrainingConfig:
    """What one run iterates over. ``loss_mode``: token_mean, per_sample or per_token;
    ``micro_batches``: micro-batches per data-parallel rank and iteration."""

    micro_batch_size: int
    global_batch_size: int
    micro_batches: int
    train_iters: int
    exit_interval: int | None
    seed: int
    eval_interval: int
    eval_iters: int
    loss_mode: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds batch sizes, iterations, seed, evaluation cadence and the loss-mode flags."""
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=positive_int, default=1)
    group.add_argument("--global-batch-size", type=positive_int, default=None,
                       help="default: micro batch size x data-parallel size")
    group.add_argument("--train-iters", type=positive_int, default=100)
    group.add_argument("--exit-interval", type=positive_int, default=None)
    group.add_argument("--seed", type=ranged(int, 0, 2**31 - 1), default=1234)
    group.add_argument("--calculate-per-sample-loss", action="store_true")
    group.add_argument("--calculate-per-token-loss", action="store_true")
    group.add_argument("--eval-interval", type=positive_int, default=1000)
    group.add_argument("--eval-iters", type=non_negative_int, default=100)


def fill_defaults(args: argparse.Namespace, data_parallel_size: int) -> None:
    """--global-batch-size defaults to one micro-batch per data-parallel rank."""
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel_size


def check(args: argparse.Namespace, data_parallel_size: int) -> None:
    """Batch sizes that do not divide over the data-parallel ranks, both loss modes."""
    if args.global_batch_size % (args.micro_batch_size * data_parallel_size):
        raise ConfigError(f"--global-batch-size {args.global_batch_size} is not divisible by micro batch size x "
                          f"data-parallel size = {args.micro_batch_size} x {data_parallel_size}")
    if args.calculate_per_sample_loss and args.calculate_per_token_loss:
        raise ConfigError("--calculate-per-sample-loss and --calculate-per-token-loss are mutually exclusive")
    micro_batches, pp = args.global_batch_size // (args.micro_batch_size * data_parallel_size), \
        args.pipeline_model_parallel_size
    if args.virtual_pipeline_model_parallel_size is not None and micro_batches % pp:
        raise ConfigError(f"the interleaved pipeline schedule needs the micro-batches of an iteration ({micro_batches} "
                          f"= global batch / (micro batch x DP)) to be a multiple of --pipeline-model-parallel-size {pp}")


def _loss_mode(args: argparse.Namespace) -> str:
    if args.calculate_per_sample_loss:
        return "per_sample"
    if args.calculate_per_token_loss:
        return "per_token"
    return "token_mean"


def to_config(args: argparse.Namespace, data_parallel_size: int) -> TrainingConfig:
    """The :class:`TrainingConfig` of the (defaulted, checked) flags."""
    micro_batches = args.global_batch_size // (args.micro_batch_size * data_parallel_size)
    return fields_from(TrainingConfig, args, micro_batches=micro_batches, loss_mode=_loss_mode(args))
