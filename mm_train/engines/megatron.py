"""The megatron-core engine: the GPT stage in megatron's Float16Module (bf16/fp16) and
DistributedDataParallel (``--overlap-grad-reduce``, ``--ddp-bucket-size``), megatron's optimizer (the
distributed optimizer with ``--use-distributed-optimizer``, ``--overlap-param-gather``), and
``--ckpt-format torch`` checkpoints (:mod:`mm_train.checkpoint.torch_format`)."""

from __future__ import annotations

from pathlib import Path

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module

from mm_train.checkpoint.state import TrainingState
from mm_train.checkpoint.torch_format import load_checkpoint, save_checkpoint
from mm_train.engines.gpt import GPTEngine
from mm_train.model.build import build_model, transformer_config
from mm_train.optim import build_megatron_optimizer


class MegatronEngine(GPTEngine):
    """megatron-core DDP and optimizer over this rank's GPT stage (TP, PP, CP, EP, DP layouts)."""

    def build_model(self, vocab_size: int) -> None:
        """The stage, wrapped in Float16Module (with --bf16/--fp16) and DDP, and megatron's optimizer."""
        config, parallel = self.config, self.config.parallel
        transformer = transformer_config(config)
        self.stage = build_model(config, transformer, vocab_size, self.context_parallel)
        module = Float16Module(transformer, self.stage) if (config.precision.bf16 or config.precision.fp16) \
            else self.stage
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            use_distributed_optimizer=parallel.use_distributed_optimizer, bucket_size=parallel.ddp_bucket_size)
        self.model = DistributedDataParallel(transformer, ddp_config, module)
        transformer.finalize_model_grads_func = finalize_model_grads
        transformer.no_sync_func = self.model.no_sync
        if parallel.overlap_grad_reduce:
            transformer.grad_sync_func = self.model.start_grad_sync
        self.optimizer = build_megatron_optimizer(config.optimizer, config.precision, parallel, [self.model])
        # The schedule multiplies each micro-batch's loss (and MoE aux losses) by the loss scale before
        # the backward pass; the optimizer divides the gradients by it (fp16; 1.0 otherwise).
        transformer.grad_scale_func = self.optimizer.scale_loss

    def zero_grad(self) -> None:
        """Clears DDP's gradient buffers and the optimizer's gradients."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def loss_scale(self) -> float:
        """megatron's loss scale (1.0 for bf16 and fp32)."""
        return float(self.optimizer.get_loss_scale())

    def restore(self) -> TrainingState:
        """The newest torch-format checkpoint under --load into the stage, optimizer and schedule."""
        options = self.config.checkpoint
        return load_checkpoint(options.load, self.stage, self.optimizer, self.scheduler, options,
                               self.config.parallel.use_distributed_optimizer)

    def save(self, state: TrainingState) -> Path:
        """A torch-format checkpoint of ``state.iteration`` under --save (parameters gathered first when
        --overlap-param-gather defers the gathering to the next forward)."""
        overlapped = self.config.parallel.overlap_param_gather
        if overlapped:
            self.model.disable_forward_pre_hook(param_sync=True)
        directory = save_checkpoint(self.config.checkpoint.save, state, self.stage, self.optimizer, self.scheduler,
                                    self.config.checkpoint, self.config.parallel.use_distributed_optimizer,
                                    self.config.record())
        if overlapped:
            self.model.enable_forward_pre_hook()
        return directory
