"""The training loop: iterations up to --train-iters (or --exit-interval), Megatron's iteration line,
the progress bar and TensorBoard, evaluation every --eval-interval and checkpoints every
--save-interval and at the end. After each iteration the run's guard (:mod:`mm_train.features.resilience`)
stops it: without saving on a NaN/Inf, with a checkpoint on a stop signal or at the time limit.
Everything model-specific is the engine's (:mod:`mm_train.engines`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mm_train.checkpoint.state import TrainingState
from mm_train.config import RunConfig
from mm_train.engines.base import Engine, StepResult
from mm_train.features.resilience import RunGuard
from mm_train.reporting import IterationStats, ProgressBar, TensorBoard, iteration_line, validation_line


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _print_last(text: str) -> None:
    if _is_last_rank():
        print(text, flush=True)


@dataclass
class _Interval:
    """Sums over the iterations since the last iteration line."""

    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    skipped: int = 0
    nan: int = 0
    aux_sums: dict[str, float] = field(default_factory=dict)

    def add(self, result: StepResult) -> None:
        self.iterations += 1
        self.tokens += result.tokens
        self.skipped += int(not result.updated)
        for name, value in result.aux_losses.items():
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value
        if result.loss is not None:
            self.nan += int(not np.isfinite(result.loss))
            self.loss_sum += result.loss

    def stats(self, state: TrainingState, config: RunConfig, learning_rate: float,
              grad_norm: float | None) -> IterationStats:
        seconds = time.perf_counter() - self.start
        training = config.training
        return IterationStats(
            iteration=state.iteration, train_iters=training.train_iters,
            consumed_samples=state.consumed_train_samples, elapsed_ms=1000.0 * seconds / self.iterations,
            learning_rate=learning_rate, global_batch_size=training.global_batch_size,
            loss=self.loss_sum / self.iterations, grad_norm=grad_norm, tokens_per_second=self.tokens / seconds,
            skipped_iterations=self.skipped, nan_iterations=self.nan,
            aux_losses={name: total / self.iterations for name, total in self.aux_sums.items()})


def _every(iteration: int, interval: int | None) -> bool:
    return bool(interval) and iteration % interval == 0


def _save(engine: Engine, state: TrainingState, config: RunConfig) -> None:
    engine.save(state)
    _print_last(f"saved checkpoint at iteration {state.iteration} to {config.checkpoint.save}")


def train(engine: Engine, config: RunConfig, state: TrainingState, guard: RunGuard) -> None:
    """Trains from ``state`` (as :meth:`Engine.load` returned it) to the end of the run, or until
    ``guard`` stops it (:class:`mm_train.features.resilience.NonFiniteError` when the loss or the
    gradient norm is not finite)."""
    training, logging, checkpoint = config.training, config.logging, config.checkpoint
    train_data, valid_data = engine.data(state)
    bar = ProgressBar(training.train_iters, enabled=_is_last_rank())
    board = TensorBoard(logging.tensorboard_dir, enabled=_is_last_rank())
    interval = _Interval()
    while state.iteration < training.train_iters:
        result = engine.train_step(train_data)
        state.iteration += 1
        state.consumed_train_samples += training.global_batch_size
        stop = guard.after_iteration(state.iteration, result.loss, result.grad_norm)
        interval.add(result)
        bar.update(state.iteration, result.loss)
        if _every(state.iteration, logging.tensorboard_log_interval) and result.loss is not None:
            board.scalars(state.iteration, {"lm loss": result.loss, "learning-rate": engine.learning_rate()})
        if _every(state.iteration, logging.log_interval):
            bar.clear()
            _print_last(iteration_line(interval.stats(state, config, engine.learning_rate(), result.grad_norm)))
            interval = _Interval()
        if valid_data is not None and training.eval_iters > 0 and _every(state.iteration, training.eval_interval):
            valid_loss = engine.evaluate(valid_data, training.eval_iters)
            if valid_loss is not None:
                _print_last(validation_line(state.iteration, valid_loss))
                board.scalars(state.iteration, {"validation lm loss": valid_loss})
        if checkpoint.save and _every(state.iteration, checkpoint.save_interval):
            _save(engine, state, config)
        if stop is not None:
            bar.clear()
            _print_last(f"exiting after iteration {state.iteration}: {stop}")
            break
        if _every(state.iteration, training.exit_interval):
            break
    if checkpoint.save and not _every(state.iteration, checkpoint.save_interval):
        _save(engine, state, config)
    board.close()
