"""The FSDP2 engine (``--use-torch-fsdp2``) with ``--ckpt-format torch_dcp`` checkpoints.

The GPT model is not wrapped in Megatron's DDP or Float16Module and the optimizer is a torch one:

- the model is built in fp32 on the host (``--use-cpu-initialization``) and sharded with
  ``fully_shard`` per the YAML (:mod:`mm_train.features.fsdp2`); with ``--init-model-with-meta-device``
  it is built on meta, sharded, allocated shard by shard and set from the same layout-independent
  full values (:mod:`mm_train.model.init`), so no rank holds the full model;
- ``--bf16`` became FSDP2's param_dtype (compute in bf16, fp32 shards, fp32 gradient reduction unless
  the YAML says otherwise); ``--fp16`` is refused (no loss scaling here);
- megatron-core's forward/backward schedule still runs the micro-batches; FSDP2 reduce-scatters and
  averages the gradients over all ranks, and ``--calculate-per-token-loss`` rescales them by
  world size / global token count afterwards;
- the optimizer is torch AdamW/SGD with the trainer's param groups and schedule (:mod:`mm_train.optim`);
  ``--clip-grad`` clips the DTensor gradients by their global L2 norm.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch import nn
from torch.distributed.tensor import DTensor

from mm_train.checkpoint.dcp import load_dcp_checkpoint, save_dcp_checkpoint
from mm_train.checkpoint.state import TrainingState
from mm_train.engines.gpt import GPTEngine
from mm_train.features.fsdp2 import apply_fsdp2, build_fsdp2_model_on_meta
from mm_train.features.precision import PrecisionConfig
from mm_train.model.build import build_model, transformer_config
from mm_train.model.init import draw_full, global_name
from mm_train.optim import build_torch_optimizer


def _per_token_grad_scale(model_chunks: list[nn.Module], num_tokens: torch.Tensor | None, **_) -> None:
    # megatron-core's finalize hook: FSDP2 averaged the summed per-token gradients over all ranks,
    # so multiply by world size / global token count to get the per-token mean.
    if num_tokens is None:
        return
    total = num_tokens.detach().to(torch.float64)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # A device scalar, one multi-tensor call: no host sync and no kernel per parameter.
    scale = (parallel_state.get_data_parallel_world_size() / total.clamp(min=1.0)).float()
    grads = [param.grad for chunk in model_chunks for param in chunk.parameters() if param.grad is not None]
    torch._foreach_mul_(grads, scale)


class FSDP2Optimizer:
    """A torch optimizer over FSDP2 (DTensor) parameters with the step interface of Megatron's
    optimizer: ``step() -> (updated, grad norm, zeros)``, clipping by global L2 norm when
    ``clip_grad`` > 0. ``optimizer`` is the torch optimizer (what torch_dcp saves)."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad: float) -> None:
        self.optimizer = optimizer
        self.clip_grad = clip_grad

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's param groups (the scheduler sets their lr and weight decay)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Drops every gradient."""
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self) -> tuple[bool, float, None]:
        """Clips (when --clip-grad > 0) and updates; returns (True, global gradient L2 norm, None)."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)
        self.optimizer.step()
        return True, norm.item(), None


class FSDP2Engine(GPTEngine):
    """The GPT stage sharded with FSDP2 over all ranks (TP = PP = CP = EP = 1), a torch optimizer, torch_dcp."""

    def build_model(self, vocab_size: int) -> None:
        """The FSDP2-sharded fp32 GPTModel, initialised to the same values as the unsharded trainer's
        (built in host memory, or on meta with --init-model-with-meta-device), and its optimizer."""
        config, fsdp2 = self.config, self.config.fsdp2
        transformer = transformer_config(dataclasses.replace(config, precision=PrecisionConfig()))
        if fsdp2.init_model_with_meta_device:
            built: list[nn.Module] = []

            def construct() -> nn.Module:
                built.append(build_model(config, transformer, vocab_size, init=False))
                return built[0]

            def full_value(name: str, shape: torch.Size) -> torch.Tensor:
                if not config.model.initialization:  # --no-initialization: the checkpoint sets every value
                    return torch.empty(shape)
                return draw_full(global_name(built[0], name), list(shape), config.training.seed, transformer)

            self.stage = build_fsdp2_model_on_meta(construct, fsdp2.sharding, full_value, self.device)
        else:
            self.stage = apply_fsdp2(build_model(config, transformer, vocab_size, init=config.model.initialization),
                                     fsdp2.sharding)
        if config.training.loss_mode == "per_token":
            transformer.finalize_model_grads_func = _per_token_grad_scale
        self.stages = self.chunks = [self.stage]
        self.optimizer = FSDP2Optimizer(build_torch_optimizer(config.optimizer, self.stage.named_parameters(),
                                                              self.device.type),
                                        config.optimizer.clip_grad)

    def zero_grad(self) -> None:
        """Drops the gradients."""
        self.optimizer.zero_grad()

    def restore(self) -> TrainingState | None:
        """The newest torch_dcp checkpoint under --load (any world size DCP can reshard to; RNG states only
        at the saved one); --finetune loads the weights only; None when there is none."""
        options = self.config.checkpoint
        loaded = load_dcp_checkpoint(
            options.load, self.stage, self.optimizer.optimizer, scheduler=self.scheduler,
            load_optim=options.load_optim and not options.finetune,
            load_rng=options.load_rng and not options.finetune, rng_tracker=get_cuda_rng_tracker())
        if loaded is None:
            return None
        if options.finetune:
            return TrainingState()
        return TrainingState(loaded.iteration, loaded.consumed_samples)

    def save(self, state: TrainingState) -> Path:
        """A torch_dcp checkpoint of ``state.iteration`` under --save."""
        options = self.config.checkpoint
        return save_dcp_checkpoint(options.save, state.iteration, self.stage, self.optimizer.optimizer,
                                   scheduler=self.scheduler, consumed_samples=state.consumed_train_samples,
                                   save_optim=options.save_optim, save_rng=options.save_rng,
                                   rng_tracker=get_cuda_rng_tracker(), metadata={"config": self.config.record()})
