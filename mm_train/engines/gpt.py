"""What the two GPT engines share: the megatron-core GPTModel on a megatron-core parallel state, its
set-up (CPU adaptor, fused kernels, context-parallel groups, seeds, tokenizer), its batches, and
megatron-core's forward/backward schedule over the micro-batches of an iteration.

A subclass wraps the model (:mod:`mm_train.engines.megatron`, :mod:`mm_train.engines.fsdp2`), owns the
optimizer and the checkpoint format (:meth:`GPTEngine.restore`; :meth:`GPTEngine.load` first checks that
the checkpoint holds this run's model), and clears gradients its own way (:meth:`GPTEngine.zero_grad`).
"""

from __future__ import annotations

import random
from abc import abstractmethod
from collections.abc import Iterator

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm_train.checkpoint.compatibility import check_saved_model
from mm_train.checkpoint.state import TrainingState
from mm_train.config import RunConfig
from mm_train.data import build_data_iterators, build_tokenizer
from mm_train.engines.base import Engine, StepResult
from mm_train.features import fused_kernels
from mm_train.features.context_parallel import (
    ContextParallel,
    cp_loss_function,
    set_up_context_parallel,
    shard_batch,
)
from mm_train.features.moe import aux_loss_figures
from mm_train.features.parallel import initialize_model_parallel
from mm_train.launch import Launch
from mm_train.loss import loss_function
from mm_train.model.build import padded_vocab_size
from mm_train.optim import build_scheduler, learning_rate
from mm_train.platform.cpu_adaptor import apply_cpu_adaptor


def _set_seeds(seed: int) -> None:
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


class GPTEngine(Engine):
    """The GPT model trained through megatron-core's schedule. Subclasses set ``model`` (what the
    schedule runs), ``stage`` (the unwrapped GPTModel stage: what is initialised and saved) and
    ``optimizer`` (megatron-core's step interface: ``step() -> (updated, grad norm, zeros)``) in
    :meth:`build_model`."""

    def __init__(self, config: RunConfig, launch: Launch) -> None:
        self.config = config
        self.launch = launch
        if launch.device_type == "cpu":
            apply_cpu_adaptor()
        fused_kernels.apply(config.fused_kernels, config.moe)
        moe = config.moe
        initialize_model_parallel(config.parallel, config.context_parallel.size,
                                  moe.expert_model_parallel_size if moe else 1, moe is not None)
        try:
            self.context_parallel: ContextParallel | None = set_up_context_parallel(
                config.context_parallel, config.parallel.timeout)
            _set_seeds(config.training.seed)
            data = config.data
            self.tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size)
            vocab = padded_vocab_size(max(self.tokenizer.vocab_size, data.vocab_size or 0),
                                      config.model.make_vocab_size_divisible_by,
                                      config.parallel.tensor_model_parallel_size)
            self.build_model(vocab)
            self.scheduler = build_scheduler(config.optimizer, config.training, self.optimizer)
        except BaseException:
            parallel_state.destroy_model_parallel()
            raise

    @abstractmethod
    def build_model(self, vocab_size: int) -> None:
        """Builds and wraps this rank's model stage for ``vocab_size`` and its optimizer."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Clears the gradients before an iteration."""

    @abstractmethod
    def restore(self) -> TrainingState:
        """Restores the newest checkpoint under --load in the engine's format (there is one)."""

    def load(self) -> TrainingState:
        """The newest checkpoint under --load, once its saved model configuration matched this run's
        (:func:`mm_train.checkpoint.compatibility.check_saved_model`); a fresh state without --load."""
        if not self.config.checkpoint.load:
            return TrainingState()
        check_saved_model(self.config.checkpoint.load, self.config.record())
        return self.restore()

    def loss_scale(self) -> float:
        """The optimizer's loss scale (1.0 unless it scales the loss)."""
        return 1.0

    def data(self, state: TrainingState) -> tuple[Iterator[dict], Iterator[dict] | None]:
        """Micro-batch iterators of this data-parallel rank (see :func:`mm_train.data.build_data_iterators`)."""
        return build_data_iterators(self.config.data, self.tokenizer, state.consumed_train_samples,
                                    parallel_state.get_data_parallel_rank(),
                                    parallel_state.get_data_parallel_world_size())

    def _forward_step(self):
        mode, context_parallel = self.config.training.loss_mode, self.context_parallel

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            if context_parallel is not None:
                return output, cp_loss_function(mode, batch["loss_mask"], context_parallel)
            return output, loss_function(mode, batch["loss_mask"])

        return forward_step

    @staticmethod
    def _reduce_loss(losses: list[dict]) -> float | None:
        """Objective value of the global batch from the micro-batch reports (last stage; None elsewhere)."""
        if not parallel_state.is_pipeline_last_stage():
            return None
        total = torch.stack([report["lm loss"] for report in losses]).sum(dim=0) if losses else torch.zeros(2)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return (total[0] / total[1].clamp(min=1e-12)).item()

    def _run_schedule(self, data: Iterator[dict], forward_only: bool) -> tuple[float | None, int]:
        """Forward (and backward) over this rank's micro-batches of the next global batch; returns the
        loss and the (global, padded) sequence length. The batches come padded to one length that
        keeps the sequence padding rule; each is cut to this CP rank's piece."""
        training = self.config.training
        batches = [next(data) for _ in range(training.micro_batches)]
        length = batches[0]["tokens"].shape[1]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step(),
            data_iterator=iter([shard_batch(batch, self.context_parallel) for batch in batches]),
            model=[self.model], num_microbatches=len(batches), seq_length=length,
            micro_batch_size=training.micro_batch_size, forward_only=forward_only)
        return self._reduce_loss(losses), length

    def train_step(self, data: Iterator[dict]) -> StepResult:
        """One iteration: forward/backward over the global batch, optimizer and schedule step."""
        training = self.config.training
        self.zero_grad()
        loss, length = self._run_schedule(data, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=training.global_batch_size)
        aux_losses = aux_loss_figures(self.config.moe, self.config.model.num_layers, training.micro_batches)
        return StepResult(loss=loss, grad_norm=grad_norm, updated=updated, tokens=training.global_batch_size * length,
                          loss_scale=self.loss_scale(), aux_losses=aux_losses)

    def evaluate(self, data: Iterator[dict], iterations: int) -> float | None:
        """Mean objective over ``iterations`` global batches (last pipeline stage; None elsewhere)."""
        self.model.eval()
        values = []
        with torch.no_grad():
            for _ in range(iterations):
                values.append(self._run_schedule(data, forward_only=True)[0])
        self.model.train()
        return None if values[0] is None else sum(values) / len(values)

    def learning_rate(self) -> float:
        """The schedule's learning rate (before any --lr-mult)."""
        return learning_rate(self.optimizer)

    def close(self) -> None:
        """Destroys megatron-core's parallel state."""
        parallel_state.destroy_model_parallel()
