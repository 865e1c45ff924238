"""The engine interface: how a model is wrapped, stepped, evaluated, saved and loaded.

The training loop (:mod:`mm_train.loop`) calls only these methods, so it has no branch for a
wrapping (megatron-core DDP, FSDP2), a model family or a checkpoint format. An engine owns its
model, optimizer, schedule, batches and checkpoint format; everything it is configured with comes
from the :class:`mm_train.config.RunConfig` it was built from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mm_train.checkpoint.state import TrainingState


@dataclass(frozen=True)
class StepResult:
    """What one training iteration reports to the loop.

    loss: the objective of the global batch (the same on every rank that holds it; None on ranks
        that do not, e.g. pipeline stages before the last).
    grad_norm: global L2 norm of the gradients before clipping (None when not computed).
    updated: False when the optimizer skipped the update (e.g. an fp16 overflow).
    tokens: tokens of the global batch that count in the loss (padding excluded; 0 on ranks that do not
        hold the loss).
    loss_scale: the loss scale in effect (1.0 without dynamic loss scaling).
    aux_losses: extra losses to log as ``name: value`` (e.g. MoE load balancing).
    """

    loss: float | None
    grad_norm: float | None
    updated: bool
    tokens: int
    loss_scale: float = 1.0
    aux_losses: Mapping[str, float] = field(default_factory=dict)


class Engine(ABC):
    """One way of training a model. Every method is collective: all ranks call it, in the same order."""

    @abstractmethod
    def load(self) -> TrainingState:
        """Restores the newest checkpoint of --load (a fresh state without --load, or when it holds none).
        Raises :class:`mm_train.errors.CheckpointError` (on every rank) for one that cannot be loaded."""

    @abstractmethod
    def data(self, state: TrainingState) -> tuple[Iterator, Iterator | None]:
        """Train and validation batches (validation None when there is none), continuing after the
        samples ``state`` has consumed. The loop passes them back to :meth:`train_step` / :meth:`evaluate`."""

    @abstractmethod
    def train_step(self, data: Iterator) -> StepResult:
        """One iteration: forward and backward over one global batch from ``data``, optimizer and
        schedule step."""

    @abstractmethod
    def evaluate(self, data: Iterator, iterations: int) -> float | None:
        """Mean objective over ``iterations`` global batches of ``data``, without updates (None on
        ranks that do not hold the loss)."""

    @abstractmethod
    def learning_rate(self) -> float:
        """The learning rate of the schedule now."""

    @abstractmethod
    def floating_point_operations(self) -> float | None:
        """Floating-point operations of one iteration (forward and backward), Megatron's estimate; None when
        the engine has no estimate (then --log-throughput prints nothing)."""

    @abstractmethod
    def save(self, state: TrainingState) -> Path:
        """Saves a checkpoint of iteration ``state.iteration`` to --save, atomically; returns its directory."""

    @abstractmethod
    def close(self) -> None:
        """Releases what the engine set up (parallel state, process groups it created)."""
