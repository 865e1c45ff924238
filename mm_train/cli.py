"""``mm-train``: the parser assembled from the features, and ``main``.

Flags keep Megatron's and MindSpeed-MM's names and defaults, so MindSpeed-MM launch scripts run
unchanged; each is defined and checked by one module of :mod:`mm_train.features`. A leading
``CONFIG.yaml`` (MindSpeed-MM's ``pretrain_transformers`` form) stands for its flags
(:func:`mm_train.features.multimodal.expand_config_file`). ``main`` turns the command line into a
:class:`mm_train.config.RunConfig`, builds the engine and runs the loop. A user's mistake ends with
one line and a non-zero exit: 2 for a flag, 1 for what is found at start-up.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mm_train.checkpoint.compatibility import completed_iteration
from mm_train.config import FEATURES, build_config
from mm_train.engines import build_engine
from mm_train.errors import ConfigError, UserError
from mm_train.features import allocator
from mm_train.features.multimodal import expand_config_file
from mm_train.features.resilience import RunGuard
from mm_train.launch import init_process_group, read_launch
from mm_train.loop import train
from mm_train.platform.quiet import fallback_notice


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (``mm-train: error: argument --hidden-size: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full mm-train argument parser: every feature's flags."""
    parser = _Parser(
        prog="mm-train", usage="%(prog)s [CONFIG.yaml] [flags]",
        description="Megatron-core GPT training, and Hugging Face vision-language models on FSDP2 "
                    "(CONFIG.yaml or --mm-model/--mm-data), with MindSpeed-MM style flags.",
        allow_abbrev=False)
    for feature in FEATURES:
        feature.add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses ``argv`` (default sys.argv[1:]; a leading CONFIG.yaml is expanded); unknown flags or bad
    values exit 2 with one line, a bad CONFIG.yaml raises ConfigError."""
    return build_parser().parse_args(expand_config_file(sys.argv[1:] if argv is None else argv))


def _error(error: Exception) -> None:
    print(f"mm-train: error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mm-train`` / ``python -m mm_train``; returns the exit status."""
    try:
        args = parse_args(argv)
        launch = read_launch(args.local_rank)
        config = build_config(args, launch)
    except ConfigError as error:
        _error(error)
        return 2
    allocator.apply(config.allocator)
    engine = None
    guard = RunGuard(config.resilience)
    try:
        complete = completed_iteration(config.checkpoint, config.training.train_iters)
        if complete is not None:
            if launch.rank == 0:
                print(f"mm-train: training is already complete: {config.checkpoint.load} holds iteration {complete}, "
                      f"--train-iters is {config.training.train_iters}; nothing to do", flush=True)
            return 0
        if launch.rank == 0:
            for line in (*config.notices, *fallback_notice()):
                print(f"mm-train: {line}", flush=True)
        init_process_group(launch, config.parallel.distributed_backend, config.parallel.timeout)
        engine = build_engine(config, launch)
        state = engine.load()
        train(engine, config, state, guard)
    except UserError as error:
        _error(error)
        return 1
    finally:
        guard.close()
        if engine is not None:
            engine.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def console_main() -> None:
    """The ``mm-train`` console script."""
    sys.exit(main())
