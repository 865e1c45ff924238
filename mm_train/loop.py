"""The training loop: iterations up to --train-iters (or --exit-interval), Megatron-LM's iteration line,
the progress bar and TensorBoard, evaluation every --eval-interval and checkpoints every
--save-interval and at the end. After each iteration the run's guard (:mod:`mm_train.features.resilience`)
stops it: without saving on a NaN/Inf, with a checkpoint on a stop signal or at the time limit.
Everything model-specific is the engine's (:mod:`mm_train.engines`).

As in Megatron-LM, the iteration line comes every --log-interval iterations and after the first
iteration of a run (that one does not start a new interval), and the time per iteration counts
training only: the interval clock stops while the run evaluates or saves a checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from mm_train.checkpoint import messages
from mm_train.checkpoint.state import TrainingState
from mm_train.config import RunConfig
from mm_train.engines.base import Engine, StepResult
from mm_train.features.resilience import RunGuard
from mm_train.launch import is_last_rank, print_last_rank
from mm_train.reporting import IterationStats, ProgressBar, TensorBoard, iteration_line, validation_line


class IntervalClock:
    """Training seconds since it started, not counting the time it was paused."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._since: float | None = time.perf_counter()

    def pause(self) -> None:
        """Stops counting (before an evaluation or a save)."""
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        """Counts again."""
        if self._since is None:
            self._since = time.perf_counter()

    def elapsed(self) -> float:
        """The training seconds so far."""
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)


@dataclass
class _Interval:
    """Sums over the iterations since the last iteration line that closed an interval."""

    clock: IntervalClock = field(default_factory=IntervalClock)
    iterations: int = 0
    loss_sum: float = 0.0
    losses: int = 0
    tokens: int = 0
    skipped: int = 0
    nan: int = 0
    aux_sums: dict[str, float] = field(default_factory=dict)

    def add(self, result: StepResult) -> None:
        """Counts one iteration. As in Megatron-LM, the loss of an iteration whose update was skipped (fp16
        overflow) is left out of the mean and counted as a nan iteration when it is not finite."""
        self.iterations += 1
        self.tokens += result.tokens
        self.skipped += int(not result.updated)
        for name, value in result.aux_losses.items():
            self.aux_sums[name] = self.aux_sums.get(name, 0.0) + value
        if result.loss is None:
            return
        if result.updated:
            self.loss_sum += result.loss
            self.losses += 1
        else:
            self.nan += int(not math.isfinite(result.loss))

    def stats(self, state: TrainingState, config: RunConfig, result: StepResult, learning_rate: float,
              flops_per_iteration: float | None) -> IterationStats:
        training = config.training
        seconds = self.clock.elapsed() / self.iterations
        losses = {}
        if config.logging.log_tps:
            losses["tokens per sample"] = self.tokens / (self.iterations * training.global_batch_size)
        losses["lm loss"] = self.loss_sum / max(1, self.losses)
        losses.update({name: total / self.iterations for name, total in self.aux_sums.items()})
        throughput = None
        if flops_per_iteration is not None:
            throughput = flops_per_iteration / (seconds * 10**12 * config.parallel.world_size)
        return IterationStats(
            iteration=state.iteration, train_iters=training.train_iters,
            consumed_samples=state.consumed_train_samples, elapsed_ms=1000.0 * seconds,
            learning_rate=learning_rate, global_batch_size=training.global_batch_size, losses=losses,
            loss_scale=result.loss_scale, grad_norm=result.grad_norm, skipped_iterations=self.skipped,
            nan_iterations=self.nan, throughput=throughput)


def _every(iteration: int, interval: int | None) -> bool:
    return bool(interval) and iteration % interval == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save(engine: Engine, state: TrainingState, config: RunConfig) -> None:
    checkpoint, parallel = config.checkpoint, config.parallel
    messages.saving(state.iteration, checkpoint.save, checkpoint.ckpt_format)
    engine.save(state)
    messages.saved(state.iteration, checkpoint.save, parallel.tensor_model_parallel_size,
                   parallel.pipeline_model_parallel_size)


def train(engine: Engine, config: RunConfig, state: TrainingState, guard: RunGuard) -> None:
    """Trains from ``state`` (as :meth:`Engine.load` returned it) to the end of the run, or until
    ``guard`` stops it (:class:`mm_train.features.resilience.NonFiniteError` when the loss or the
    gradient norm is not finite)."""
    training, logging, checkpoint = config.training, config.logging, config.checkpoint
    train_data, valid_data = engine.data(state)
    bar = ProgressBar(training.train_iters, enabled=is_last_rank())
    board = TensorBoard(logging.tensorboard_dir, enabled=is_last_rank())
    flops = engine.floating_point_operations() if logging.log_throughput else None
    first_iteration = state.iteration + 1
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
        closes_interval = _every(state.iteration, logging.log_interval)
        if closes_interval or state.iteration == first_iteration:
            _barrier()
            bar.clear()
            print_last_rank(iteration_line(interval.stats(state, config, result, engine.learning_rate(), flops)))
            if closes_interval:
                interval = _Interval()
        interval.clock.pause()
        if valid_data is not None and training.eval_iters > 0 and _every(state.iteration, training.eval_interval):
            valid_loss = engine.evaluate(valid_data, training.eval_iters)
            if valid_loss is not None:
                print_last_rank(validation_line(state.iteration, valid_loss))
                board.scalars(state.iteration, {"validation lm loss": valid_loss})
        if checkpoint.save and _every(state.iteration, checkpoint.save_interval):
            _save(engine, state, config)
        interval.clock.resume()
        if stop is not None:
            bar.clear()
            print_last_rank(f"exiting after iteration {state.iteration}: {stop}")
            break
        if _every(state.iteration, training.exit_interval):
            break
    if checkpoint.save and not _every(state.iteration, checkpoint.save_interval):
        _save(engine, state, config)
    board.close()
