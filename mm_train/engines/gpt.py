"""What the two GPT engines share: the megatron-core GPTModel on a megatron-core parallel state, its
set-up (CPU adaptor, stand-ins for missing optional packages, fused kernels, context-parallel groups, seeds, tokenizer, vocabulary), its batches,
and megatron-core's forward/backward schedule over the micro-batches of an iteration (the interleaved
one when a pipeline rank holds several virtual stages).

The model and the batches live on this process's device (the CPU, or accelerator LOCAL_RANK). A
subclass wraps the model (:mod:`mm_train.engines.megatron`, :mod:`mm_train.engines.fsdp2`), owns the
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
from torch import nn

from mm_train.checkpoint.compatibility import check_saved_model
from mm_train.checkpoint.state import TrainingState
from mm_train.config import RunConfig
from mm_train.data import build_data_iterators, build_tokenizer
from mm_train.engines.base import Engine, StepResult
from mm_train.errors import CheckpointError, ConfigError
from mm_train.features import fused_kernels
from mm_train.features.context_parallel import (
    ContextParallel,
    cp_loss_function,
    set_up_context_parallel,
    shard_batch,
)
from mm_train.features.logging import num_floating_point_operations
from mm_train.features.moe import aux_loss_figures
from mm_train.features.parallel import initialize_model_parallel
from mm_train.launch import Launch, print_rank_0
from mm_train.loss import loss_function
from mm_train.model.build import padded_vocab_size
from mm_train.optim import build_scheduler, learning_rate
from mm_train.platform.cpu_adaptor import apply_cpu_adaptor, apply_package_fallbacks


def _set_seeds(seed: int) -> None:
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


class GPTEngine(Engine):
    """The GPT model trained through megatron-core's schedule. Subclasses set ``chunks`` (what the
    schedule runs: one module, or one per virtual pipeline stage), ``stages`` (the unwrapped GPTModel
    of each chunk: what is initialised and saved) and ``optimizer`` (megatron-core's step interface:
    ``step() -> (updated, grad norm, zeros)``) in :meth:`build_model`."""

    chunks: list[nn.Module]
    stages: list[nn.Module]

    def __init__(self, config: RunConfig, launch: Launch) -> None:
        self.config = config
        self.launch = launch
        self.device = launch.device
        if launch.device_type == "cpu":
            apply_cpu_adaptor()
        apply_package_fallbacks()
        self.kernel_patch = fused_kernels.apply(config.fused_kernels, config.moe)
        moe = config.moe
        initialize_model_parallel(config.parallel, config.context_parallel.size,
                                  moe.expert_model_parallel_size if moe else 1, moe is not None)
        try:
            self.context_parallel: ContextParallel | None = set_up_context_parallel(
                config.context_parallel, config.parallel.timeout)
            _set_seeds(config.training.seed)
            self.tokenizer = build_tokenizer(config.data.tokenizer)
            self.vocab_size = self._model_vocab_size(self.tokenizer.vocab_size)
            self.build_model(self.vocab_size)
            self.scheduler = build_scheduler(config.optimizer, config.training, self.optimizer)
        except BaseException:
            self.kernel_patch.restore()
            parallel_state.destroy_model_parallel()
            raise

    def _model_vocab_size(self, tokenizer_vocab: int) -> int:
        """--padded-vocab-size, or the tokenizer's vocabulary padded by Megatron's rule (and its line)."""
        model = self.config.model
        if model.padded_vocab_size is not None:
            if model.padded_vocab_size < tokenizer_vocab:
                raise ConfigError(f"--padded-vocab-size {model.padded_vocab_size} is smaller than the tokenizer's "
                                  f"{tokenizer_vocab} ids")
            return model.padded_vocab_size
        padded = padded_vocab_size(tokenizer_vocab, model.make_vocab_size_divisible_by,
                                   self.config.parallel.tensor_model_parallel_size)
        print_rank_0(f" > padded vocab (size: {tokenizer_vocab}) with {padded - tokenizer_vocab} dummy tokens "
                      f"(new size: {padded})")
        return padded

    @abstractmethod
    def build_model(self, vocab_size: int) -> None:
        """Builds and wraps this rank's model stage(s) for ``vocab_size`` on the device, and the optimizer."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Clears the gradients before an iteration."""

    @abstractmethod
    def restore(self) -> TrainingState | None:
        """Restores the newest checkpoint under --load in the engine's format; None when there is none
        (after Megatron's warning)."""

    def load(self) -> TrainingState:
        """The newest checkpoint under --load, once its saved model configuration matched this run's
        (:func:`mm_train.checkpoint.compatibility.check_saved_model`); a fresh state without --load or
        when it holds no checkpoint (refused with --no-initialization: the weights must come from one)."""
        options, loaded = self.config.checkpoint, None
        if options.load:
            check_saved_model(options.load, self.config.record())
            loaded = self.restore()
        if loaded is None and not self.config.model.initialization:
            raise CheckpointError(f"--no-initialization: no checkpoint under --load {options.load} to take the "
                                  "weights from")
        return loaded or TrainingState()

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

    def _on_device(self, batch: dict) -> dict:
        """This CP rank's piece of a host micro-batch, on the device."""
        return {name: value.to(self.device, non_blocking=True)
                for name, value in shard_batch(batch, self.context_parallel).items()}

    def _reduce(self, losses: list[dict], tokens: int) -> tuple[float | None, int]:
        """Objective value and loss tokens of the global batch from the micro-batch reports and this
        rank's token count (last pipeline stage; (None, 0) elsewhere)."""
        if not parallel_state.is_pipeline_last_stage():
            return None, 0
        reports = torch.stack([report["lm loss"] for report in losses]).sum(dim=0) if losses \
            else torch.zeros(2, device=self.device)
        total = torch.cat([reports.float(), torch.tensor([float(tokens)], device=reports.device)])
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return (total[0] / total[1].clamp(min=1e-12)).item(), int(total[2].item())

    def _run_schedule(self, data: Iterator[dict], forward_only: bool) -> tuple[float | None, int]:
        """Forward (and backward) over this rank's micro-batches of the next global batch; returns the
        loss and the loss tokens of the global batch. The batches come padded to one length that keeps
        the sequence padding rule; each is cut to this CP rank's piece and moved to the device. Every
        virtual stage of this rank reads the same micro-batches."""
        training = self.config.training
        batches = [next(data) for _ in range(training.micro_batches)]
        length = batches[0]["tokens"].shape[1]
        tokens = sum(int(batch["loss_mask"].sum()) for batch in batches)
        on_device = [self._on_device(batch) for batch in batches]
        iterators = [iter(on_device) for _ in self.chunks]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step(),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks, num_microbatches=len(batches), seq_length=length,
            micro_batch_size=training.micro_batch_size, forward_only=forward_only)
        return self._reduce(losses, tokens)

    def train_step(self, data: Iterator[dict]) -> StepResult:
        """One iteration: forward/backward over the global batch, optimizer and schedule step."""
        training = self.config.training
        self.zero_grad()
        loss, tokens = self._run_schedule(data, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=training.global_batch_size)
        aux_losses = aux_loss_figures(self.config.moe, self.config.model.num_layers, training.micro_batches)
        return StepResult(loss=loss, grad_norm=grad_norm, updated=updated, tokens=tokens,
                          loss_scale=self.loss_scale(), aux_losses=aux_losses)

    def evaluate(self, data: Iterator[dict], iterations: int) -> float | None:
        """Mean objective over ``iterations`` global batches (last pipeline stage; None elsewhere)."""
        for chunk in self.chunks:
            chunk.eval()
        values = []
        with torch.no_grad():
            for _ in range(iterations):
                values.append(self._run_schedule(data, forward_only=True)[0])
        for chunk in self.chunks:
            chunk.train()
        return None if values[0] is None else sum(values) / len(values)

    def learning_rate(self) -> float:
        """The schedule's learning rate (before any --lr-mult)."""
        return learning_rate(self.optimizer)

    def floating_point_operations(self) -> float:
        """Megatron's FLOP count of one iteration (see :func:`mm_train.features.logging.num_floating_point_operations`)."""
        config = self.config
        return num_floating_point_operations(config.model, config.moe, self.vocab_size,
                                             config.training.global_batch_size)

    def close(self) -> None:
        """Destroys megatron-core's parallel state and takes the fused kernels out of megatron-core again."""
        parallel_state.destroy_model_parallel()
        self.kernel_patch.restore()
