"""What the trainer prints: Megatron's iteration line, a progress bar on a terminal, TensorBoard scalars.

Printed by the last rank (it holds the loss under pipeline parallelism), as Megatron does.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class IterationStats:
    """One logged interval: values averaged over the iterations since the last log line."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float
    learning_rate: float
    global_batch_size: int
    loss: float
    grad_norm: float | None
    tokens_per_second: float
    skipped_iterations: int
    nan_iterations: int
    aux_losses: dict[str, float] = field(default_factory=dict)  # MoE: name -> interval mean


def iteration_line(stats: IterationStats) -> str:
    """The Megatron log line, e.g. `` iteration       10/      40 | consumed samples: ... | lm loss: 5.1E+00 |``."""
    parts = [
        f" iteration {stats.iteration:8d}/{stats.train_iters:8d}",
        f" consumed samples: {stats.consumed_samples:12d}",
        f" elapsed time per iteration (ms): {stats.elapsed_ms:.1f}",
        f" learning rate: {stats.learning_rate:.6E}",
        f" global batch size: {stats.global_batch_size:5d}",
        f" lm loss: {stats.loss:.6E}",
        *(f" {name}: {value:.6E}" for name, value in stats.aux_losses.items()),
    ]
    if stats.grad_norm is not None:
        parts.append(f" grad norm: {stats.grad_norm:.3f}")
    parts += [
        f" tokens per second: {stats.tokens_per_second:.1f}",
        f" number of skipped iterations: {stats.skipped_iterations:3d}",
        f" number of nan iterations: {stats.nan_iterations:3d}",
    ]
    return "".join(f"{part} |" for part in parts)


def validation_line(iteration: int, loss: float) -> str:
    """Megatron's validation line: loss and perplexity."""
    ppl = math.exp(min(20.0, loss))
    body = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    rule = "-" * len(body)
    return f"{rule}\n{body}\n{rule}"


class ProgressBar:
    """A tqdm bar on stderr, advanced each iteration; only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self._bar = tqdm(total=total, disable=not (enabled and sys.stderr.isatty()), file=sys.stderr,
                         unit="it", dynamic_ncols=True, leave=True)

    def update(self, iteration: int, loss: float | None) -> None:
        """Moves the bar to ``iteration`` and shows the latest loss."""
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.update(iteration - self._bar.n)
        if iteration >= self._bar.total:
            self._bar.close()

    def clear(self) -> None:
        """Erases the bar so a log line can be printed on a clean line (tqdm redraws it afterwards)."""
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
