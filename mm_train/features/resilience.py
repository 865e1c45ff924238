"""What a run does about faults, with Megatron's flags: the NaN/Inf check of the loss and the gradient
norm (``--check-for-nan-in-loss-and-grad``, on by default; ``--no-check-for-nan-in-loss-and-grad``),
the graceful stop on SIGTERM or SIGINT (``--exit-signal-handler``) and the time limit
(``--exit-duration-in-mins``), their checks, :class:`ResilienceConfig` and :class:`RunGuard`, which
the training loop asks after every iteration whether to go on.

All ranks agree: each iteration ends with one small all-reduce (MAX) of what each rank saw, so every
rank stops after the same iteration; a signal that reaches one rank only stops them all.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from dataclasses import dataclass

import torch

from mm_train.errors import UserError
from mm_train.features import fields_from, positive
from mm_train.launch import collective_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(UserError):
    """The loss or the gradient norm of an iteration was NaN or infinite: the run stops unsaved."""


@dataclass(frozen=True)
class ResilienceConfig:
    """``exit_duration_in_mins``: stop (saving first) once this many minutes have passed since start-up;
    None: no limit."""

    check_for_nan_in_loss_and_grad: bool = True
    exit_signal_handler: bool = False
    exit_duration_in_mins: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the NaN check and the exit flags."""
    group = parser.add_argument_group("faults")
    group.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                       help="stop, without saving, at the first iteration whose loss or gradient norm is NaN/Inf")
    group.add_argument("--exit-signal-handler", action="store_true",
                       help="on SIGTERM or SIGINT, finish the iteration, save (with --save) and exit 0")
    group.add_argument("--exit-duration-in-mins", type=positive, default=None,
                       help="after this many minutes, finish the iteration, save (with --save) and exit 0")


def to_config(args: argparse.Namespace) -> ResilienceConfig:
    """The :class:`ResilienceConfig` of the flags."""
    return fields_from(ResilienceConfig, args)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


class RunGuard:
    """Watches one run: records a stop signal (with --exit-signal-handler; the handlers are installed
    until :meth:`close`), the start time, and after each iteration decides with the other ranks
    (:meth:`after_iteration`) whether the run goes on."""

    def __init__(self, config: ResilienceConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.received: str | None = None
        self._previous = {}
        if config.exit_signal_handler:
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame) -> None:
        self.received = signal.Signals(number).name

    def close(self) -> None:
        """Puts back the signal handlers that were there before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _minutes(self) -> float:
        return (time.monotonic() - self.started) / 60.0

    def after_iteration(self, iteration: int, loss: float | None, grad_norm: float | None) -> str | None:
        """Collective over all ranks, after iteration ``iteration`` (its ``loss`` and ``grad_norm``
        as this rank knows them, None when it does not). Raises :class:`NonFiniteError` on every rank
        when any rank saw a NaN/Inf (with the check on); returns why the run stops now (a signal or the
        time limit), or None to go on."""
        config = self.config
        limit = config.exit_duration_in_mins
        if not (config.check_for_nan_in_loss_and_grad or config.exit_signal_handler or limit is not None):
            return None
        checking = config.check_for_nan_in_loss_and_grad
        seen = torch.tensor([checking and not _finite(loss), checking and not _finite(grad_norm),
                             self.received is not None, limit is not None and self._minutes() > limit],
                            dtype=torch.int32, device=collective_device())
        torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        bad_loss, bad_norm, signalled, late = (bool(flag) for flag in seen.tolist())
        if bad_loss or bad_norm:
            what = " and ".join(name for name, bad in (("the loss", bad_loss), ("the gradient norm", bad_norm)) if bad)
            raise NonFiniteError(
                f"iteration {iteration}: {what} is not finite (NaN or Inf); stopped without saving it, the last "
                "checkpoint is kept (lower --lr or check the data; --no-check-for-nan-in-loss-and-grad turns this "
                "check off)")
        if signalled:
            return f"received {self.received or 'a stop signal on another rank'}"
        if late:
            return f"--exit-duration-in-mins {limit:g} reached ({self._minutes():.2f} minutes)"
        return None
