"""What the trainer prints: Megatron-LM's iteration and validation lines, a progress bar on a terminal,
TensorBoard scalars.

Printed by the last rank (it holds the loss under pipeline parallelism), as Megatron does. Tools that
read Megatron logs read ours: MindSpeed-MM's scripts take the step time as the fifth ``:``-separated
field of the iteration line, the global batch size as consumed samples / iteration, and the mean of the
``tokens per sample`` fields.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from datetime import datetime


@dataclass
class IterationStats:
    """One logged interval: ``losses`` are the interval means, in print order (``tokens per sample`` with
    --log-tps, ``lm loss``, then MoE aux losses); ``throughput`` in TFLOP/s per device (None: not asked for)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    learning_rate: float
    global_batch_size: int
    losses: dict[str, float]
    loss_scale: float
    grad_norm: float | None
    skipped_iterations: int
    nan_iterations: int
    throughput: float | None = None
    timestamp: datetime = field(default_factory=datetime.now)


def iteration_line(stats: IterationStats) -> str:
    """Megatron-LM's ``training_log`` line: `` [2026-01-02 03:04:05.123456] iteration       10/      40 |
    consumed samples: ... | elapsed time per iteration (ms): ... | ... |``. A loss is printed only when
    its mean is above 0, as Megatron-LM does."""
    parts = [
        f" iteration {stats.iteration:8d}/{stats.train_iters:8d}",
        f" consumed samples: {stats.consumed_samples:12d}",
        f" elapsed time per iteration (ms): {stats.elapsed_ms:.1f}",
    ]
    if stats.throughput is not None:
        parts.append(f" throughput per GPU (TFLOP/s/GPU): {stats.throughput:.1f}")
    parts += [
        f" learning rate: {stats.learning_rate:.6E}",
        f" global batch size: {stats.global_batch_size:5d}",
        *(f" {name}: {value:.6E}" for name, value in stats.losses.items() if value > 0.0),
        f" loss scale: {stats.loss_scale:.1f}",
    ]
    if stats.grad_norm is not None:
        parts.append(f" grad norm: {stats.grad_norm:.3f}")
    parts += [
        f" number of skipped iterations: {stats.skipped_iterations:3d}",
        f" number of nan iterations: {stats.nan_iterations:3d}",
    ]
    return f" [{stats.timestamp:%Y-%m-%d %H:%M:%S.%f}]" + "".join(f"{part} |" for part in parts)


def validation_line(iteration: int, loss: float) -> str:
    """Megatron's validation line: loss and perplexity."""
    ppl = math.exp(min(20.0, loss))
    body = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    rule = "-" * (len(body) + 1)
    return f"{rule}\n{body}\n{rule}"


class ProgressBar:
    """A tqdm bar on stderr, advanced each iteration; only when stderr is a terminal (tqdm is not
    needed otherwise)."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="it", dynamic_ncols=True, leave=True)

    def update(self, iteration: int, loss: float | None) -> None:
        """Moves the bar to ``iteration`` and shows the latest loss."""
        if self._bar is None:
            return
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.update(iteration - self._bar.n)
        if iteration >= self._bar.total:
            self._bar.close()

    def clear(self) -> None:
        """Erases the bar so a log line can be printed on a clean line (tqdm redraws it afterwards)."""
        if self._bar is not None:
            self._bar.clear()


class TensorBoard:
    """Scalars under --tensorboard-dir (nothing when it is not set or this rank does not write)."""

    def __init__(self, directory: str | None, enabled: bool):
        self.writer = None
        if directory and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=directory)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        """Adds each ``name: value`` at step ``iteration``."""
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        """Flushes and closes the writer."""
        if self.writer is not None:
            self.writer.close()
