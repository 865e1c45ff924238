"""The megatron-core engine: the GPT stage(s) of this rank on its device, each in megatron's Float16Module
(bf16/fp16) and DistributedDataParallel (``--overlap-grad-reduce``, ``--ddp-bucket-size``), megatron's
optimizer over all of them (the distributed optimizer with ``--use-distributed-optimizer``,
``--overlap-param-gather``), and ``--ckpt-format torch`` (:mod:`mm_train.checkpoint.torch_format`) or
``torch_dist`` (:mod:`mm_train.checkpoint.dist`) checkpoints.

With virtual pipeline stages (the interleaved schedule) a rank holds one GPTModel chunk per virtual
stage, as Megatron-LM does: the first chunk's DDP buckets its gradients, the others keep one bucket.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module

from mm_train.checkpoint import dist, torch_format
from mm_train.checkpoint.state import TrainingState
from mm_train.engines.gpt import GPTEngine
from mm_train.model.build import build_model, to_device, transformer_config
from mm_train.optim import build_megatron_optimizer


def _one_or_list(items: list):
    return items[0] if len(items) == 1 else items


class MegatronEngine(GPTEngine):
    """megatron-core DDP and optimizer over this rank's GPT stage(s) (TP, PP with virtual stages, CP, EP, DP)."""

    def build_model(self, vocab_size: int) -> None:
        """The stage(s) on the device, wrapped in Float16Module (with --bf16/--fp16) and DDP, and megatron's
        optimizer."""
        config, parallel = self.config, self.config.parallel
        transformer = transformer_config(config)
        vp_stages = [None] if parallel.virtual_pipeline_model_parallel_size is None \
            else list(range(parallel.virtual_pipeline_model_parallel_size))
        self.stages = [to_device(build_model(config, transformer, vocab_size, self.context_parallel,
                                             init=config.model.initialization, vp_stage=stage), self.device)
                       for stage in vp_stages]
        half = config.precision.bf16 or config.precision.fp16
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
            overlap_param_gather=parallel.overlap_param_gather,
            use_distributed_optimizer=parallel.use_distributed_optimizer, bucket_size=parallel.ddp_bucket_size)
        self.chunks = [DistributedDataParallel(transformer, ddp_config, Float16Module(transformer, stage) if half
                                               else stage, disable_bucketing=index > 0)
                       for index, stage in enumerate(self.stages)]
        transformer.finalize_model_grads_func = finalize_model_grads
        transformer.no_sync_func = _one_or_list([chunk.no_sync for chunk in self.chunks])
        if parallel.overlap_grad_reduce:
            transformer.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in self.chunks])
        self.optimizer = build_megatron_optimizer(config.optimizer, config.precision, parallel, self.chunks)
        # The schedule multiplies each micro-batch's loss (and MoE aux losses) by the loss scale before
        # the backward pass; the optimizer divides the gradients by it (fp16; 1.0 otherwise).
        transformer.grad_scale_func = self.optimizer.scale_loss

    def zero_grad(self) -> None:
        """Clears DDP's gradient buffers and the optimizer's gradients."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def loss_scale(self) -> float:
        """megatron's loss scale (1.0 for bf16 and fp32)."""
        return float(self.optimizer.get_loss_scale())

    def restore(self) -> TrainingState | None:
        """The newest checkpoint under --load (--ckpt-format torch or torch_dist) into the stage(s),
        optimizer and schedule; None when --load holds none."""
        options, distributed = self.config.checkpoint, self.config.parallel.use_distributed_optimizer
        module = dist if options.ckpt_format == "torch_dist" else torch_format
        return module.load_checkpoint(options.load, self.stages, self.optimizer, self.scheduler, options, distributed)

    def save(self, state: TrainingState) -> Path:
        """A checkpoint of ``state.iteration`` under --save (parameters gathered first when
        --overlap-param-gather defers the gathering to the next forward)."""
        config = self.config
        overlapped = config.parallel.overlap_param_gather
        if overlapped:
            for chunk in self.chunks:
                chunk.disable_forward_pre_hook(param_sync=True)
        writer = dist.save_checkpoint if config.checkpoint.ckpt_format == "torch_dist" else torch_format.save_checkpoint
        directory = writer(config.checkpoint.save, state, self.stages, self.optimizer, self.scheduler,
                           config.checkpoint, config.parallel.use_distributed_optimizer, config.record(),
                           self.vocab_size, self.floating_point_operations())
        if overlapped:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()
        return directory
