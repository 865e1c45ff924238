"""The trainer's FSDP2 path (``--use-torch-fsdp2``) and ``--ckpt-format torch_dcp`` checkpoints.

With FSDP2 the GPT model is not wrapped in Megatron's DDP or Float16Module and the optimizer is
a torch one:

- the model is built in fp32 on the host (``--use-cpu-initialization``) and sharded with
  ``fully_shard`` per the YAML (mm_train.fsdp2); with ``--init-model-with-meta-device`` it is
  built on meta, sharded, allocated shard by shard and set from the same layout-independent
  full values (mm_train.meta_init), so no rank holds the full model;
- ``--bf16`` becomes FSDP2's param_dtype (compute in bf16, fp32 shards, fp32 gradient reduction
  unless the YAML says otherwise); ``--fp16`` is refused (no loss scaling here);
- megatron-core's forward/backward schedule still runs the micro-batches; FSDP2 reduce-scatters
  and averages the gradients over all ranks, and ``--calculate-per-token-loss`` rescales them
  by world size / global token count afterwards;
- the optimizer is torch AdamW/SGD with the trainer's param groups and schedule
  (mm_train.optimizer, mm_train.scheduler); ``--clip-grad`` clips the DTensor gradients by
  their global L2 norm.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch import nn
from torch.distributed.tensor import DTensor

from mm_train.checkpointing import TrainingState
from mm_train.dcp_checkpoint import load_dcp_checkpoint, save_dcp_checkpoint
from mm_train.environment import ConfigError, Launch
from mm_train.fsdp2 import FSDP2Config, FSDP2ConfigError, apply_fsdp2, load_fsdp2_config, validate_fsdp2_args
from mm_train.meta_init import build_fsdp2_model_on_meta
from mm_train.model import build_model, draw_full, global_name, transformer_config
from mm_train.optimizer import build_torch_optimizer


def validate_fsdp2_flags(args, world_size: int) -> None:
    """Refuses flag combinations the FSDP2 path and torch_dcp checkpoints cannot run (ConfigError,
    one line) and reads the FSDP2 YAML so that its errors are reported before start-up."""
    try:
        validate_fsdp2_args(args)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.ckpt_format == "torch_dcp" and not args.use_torch_fsdp2:
        raise ConfigError("--ckpt-format torch_dcp needs --use-torch-fsdp2 (Megatron's optimizer saves with "
                          "--ckpt-format torch)")
    if args.use_torch_fsdp2:
        if args.fp16:
            raise ConfigError("--use-torch-fsdp2 cannot be combined with --fp16 (no loss scaling): use --bf16")
        fsdp2_config(args, world_size)


def fsdp2_config(args, world_size: int) -> FSDP2Config:
    """The YAML of --fsdp2-config-path with --bf16 applied: param_dtype bf16 (and reduce_dtype fp32
    unless set) when the YAML leaves param_dtype null; a YAML dtype other than bf16 conflicts."""
    try:
        config = load_fsdp2_config(args.fsdp2_config_path)
    except (FSDP2ConfigError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    shard = config.sharding_size
    if shard != "auto" and world_size % shard:
        raise ConfigError(f"{args.fsdp2_config_path}: key 'sharding_size': {shard} does not divide the world "
                          f"size {world_size}")
    if not args.bf16:
        return config
    if config.param_dtype is None:
        return dataclasses.replace(config, param_dtype=torch.bfloat16,
                                   reduce_dtype=config.reduce_dtype or torch.float32)
    if config.param_dtype != torch.bfloat16:
        raise ConfigError(f"--bf16 conflicts with param_dtype {config.param_dtype} in {args.fsdp2_config_path}")
    return config


def _device(launch: Launch) -> torch.device:
    return torch.device("cpu") if launch.device_type == "cpu" else torch.device(launch.device_type, launch.local_rank)


def _per_token_grad_scale(model_chunks: list[nn.Module], num_tokens: torch.Tensor | None, **_) -> None:
    # megatron-core's finalize hook: FSDP2 averaged the summed per-token gradients over all ranks,
    # so multiply by world size / global token count to get the per-token mean.
    if num_tokens is None:
        return
    total = num_tokens.detach().to(torch.float64)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    scale = parallel_state.get_data_parallel_world_size() / max(total.item(), 1.0)
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)


def build_fsdp2_stage(args, vocab_size: int, launch: Launch) -> nn.Module:
    """The FSDP2-sharded fp32 GPTModel, initialised to the same values as the unsharded trainer's
    (built on host memory, or on meta with --init-model-with-meta-device)."""
    config = transformer_config(argparse.Namespace(**{**vars(args), "bf16": False}))
    fsdp_cfg = fsdp2_config(args, launch.world_size)
    if args.init_model_with_meta_device:
        built: list[nn.Module] = []

        def construct() -> nn.Module:
            built.append(build_model(args, config, vocab_size, init=False))
            return built[0]

        def full_value(name: str, shape: torch.Size) -> torch.Tensor:
            return draw_full(global_name(built[0], name), list(shape), args.seed, config)

        stage = build_fsdp2_model_on_meta(construct, fsdp_cfg, full_value, _device(launch))
    else:
        stage = apply_fsdp2(build_model(args, config, vocab_size), fsdp_cfg)
    if args.calculate_per_token_loss:
        config.finalize_model_grads_func = _per_token_grad_scale
    return stage


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


def build_fsdp2_optimizer(args, stage: nn.Module) -> FSDP2Optimizer:
    """torch AdamW/SGD over the sharded parameters with the trainer's param groups."""
    return FSDP2Optimizer(build_torch_optimizer(args, stage.named_parameters()), args.clip_grad)


def save_dcp(args, state: TrainingState, stage: nn.Module, optimizer: FSDP2Optimizer, scheduler) -> None:
    """Saves iteration ``state.iteration`` to --save as a torch_dcp checkpoint (collective)."""
    save_dcp_checkpoint(args.save, state.iteration, stage, optimizer.optimizer, scheduler=scheduler,
                        consumed_samples=state.consumed_train_samples, save_optim=not args.no_save_optim,
                        save_rng=not args.no_save_rng, rng_tracker=get_cuda_rng_tracker())


def load_dcp(args, stage: nn.Module, optimizer: FSDP2Optimizer, scheduler) -> TrainingState:
    """Restores the newest torch_dcp checkpoint under --load (any world size DCP can reshard to;
    RNG states only at the saved one); --finetune loads the weights only."""
    loaded = load_dcp_checkpoint(
        args.load, stage, optimizer.optimizer, scheduler=scheduler,
        load_optim=not (args.no_load_optim or args.finetune), load_rng=not (args.no_load_rng or args.finetune),
        rng_tracker=get_cuda_rng_tracker())
    if args.finetune:
        return TrainingState()
    return TrainingState(loaded.iteration, loaded.consumed_samples)
