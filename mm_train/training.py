"""The training run: set-up (process group, adaptor, kernels, model, optimizer, checkpoint, data),
the iteration loop (megatron-core forward/backward schedule, optimizer step, schedule step),
evaluation, logging and checkpoint saving."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mm_kernels.integrations.megatron import apply_fused_kernels
from mm_train.arguments import INACTIVE_FLAGS, parse_args
from mm_train.checkpointing import CheckpointError, TrainingState, load_checkpoint, save_checkpoint
from mm_train.context_parallel import (
    ContextParallel,
    cp_loss_function,
    sequence_multiple,
    set_up_context_parallel,
    shard_batch,
)
from mm_train.cpu_adaptor import apply_cpu_adaptor
from mm_train.data import build_data_iterators, build_tokenizer
from mm_train.environment import ConfigError, Launch, init_process_group, process_group_timeout, read_launch
from mm_train.fsdp2_training import build_fsdp2_optimizer, build_fsdp2_stage, load_dcp, save_dcp
from mm_train.loss import loss_function, loss_mode
from mm_train.model import build_model, padded_vocab_size, transformer_config
from mm_train.moe import aux_loss_figures
from mm_train.optimizer import build_optimizer
from mm_train.reporting import IterationStats, ProgressBar, TensorBoard, iteration_line, validation_line
from mm_train.scheduler import build_scheduler
from mm_train.validation import validate


@dataclass
class Trainer:
    """Everything one rank trains with."""

    args: object
    model: DistributedDataParallel | torch.nn.Module  # the FSDP2-sharded stage itself with --use-torch-fsdp2
    stage: torch.nn.Module
    optimizer: object
    scheduler: object
    state: TrainingState
    train_data: Iterator[dict]
    valid_data: Iterator[dict] | None
    context_parallel: ContextParallel | None = None
    mode: str = field(init=False)

    def __post_init__(self):
        self.mode = loss_mode(self.args)


def _is_last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _print_last(text: str) -> None:
    if _is_last_rank():
        print(text, flush=True)


def _set_seeds(seed: int) -> None:
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _wrap(args, config, stage: torch.nn.Module) -> DistributedDataParallel:
    module = Float16Module(config, stage) if (args.bf16 or args.fp16) else stage
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=args.ddp_bucket_size)
    model = DistributedDataParallel(config, ddp_config, module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    if args.overlap_grad_reduce:
        config.grad_sync_func = model.start_grad_sync
    return model


def set_up(args, launch: Launch) -> Trainer:
    """Builds this rank's trainer (process group and parallel state included) and loads --load."""
    init_process_group(args, launch)
    if launch.device_type == "cpu":
        apply_cpu_adaptor()
    apply_fused_kernels(rmsnorm=args.use_fused_rmsnorm, swiglu=args.use_fused_swiglu,
                        moe_permute=args.moe_permute_fusion)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                             context_parallel_size=args.context_parallel_size,
                                             expert_model_parallel_size=args.expert_model_parallel_size,
                                             expert_tensor_parallel_size=1 if args.num_experts else None,
                                             distributed_timeout_minutes=args.distributed_timeout_minutes)
    context_parallel = set_up_context_parallel(args, process_group_timeout(args))
    _set_seeds(args.seed)
    tokenizer = build_tokenizer(args)
    vocab = padded_vocab_size(max(tokenizer.vocab_size, args.vocab_size or 0), args)
    if args.use_torch_fsdp2:
        stage = model = build_fsdp2_stage(args, vocab, launch)
        optimizer = build_fsdp2_optimizer(args, stage)
    else:
        config = transformer_config(args)
        stage = build_model(args, config, vocab, context_parallel)
        model = _wrap(args, config, stage)
        optimizer = build_optimizer(args, [model])
    scheduler = build_scheduler(args, optimizer)
    if args.load and args.ckpt_format == "torch_dcp":
        state = load_dcp(args, stage, optimizer, scheduler)
    elif args.load:
        state = load_checkpoint(args.load, stage, optimizer, scheduler, args)
    else:
        state = TrainingState()
    train_data, valid_data = build_data_iterators(
        args, tokenizer, state.consumed_train_samples, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size())
    return Trainer(args, model, stage, optimizer, scheduler, state, train_data, valid_data, context_parallel)


def _pad_to(batch: dict, length: int) -> dict:
    extra = length - batch["tokens"].shape[1]
    if extra == 0:
        return batch
    return {"tokens": torch.nn.functional.pad(batch["tokens"], (0, extra)),
            "labels": torch.nn.functional.pad(batch["labels"], (0, extra)),
            "loss_mask": torch.nn.functional.pad(batch["loss_mask"], (0, extra)),
            "position_ids": torch.nn.functional.pad(batch["position_ids"], (0, extra))}


def _micro_batches(args) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def next_micro_batches(args, data: Iterator[dict],
                       context_parallel: ContextParallel | None = None) -> tuple[list[dict], int]:
    """This rank's micro-batches of the next global batch, padded to one length (a multiple of TP
    under sequence parallelism and of the context-parallel layout's multiple) and cut to this CP
    rank's piece; returns them and the padded (global) length."""
    count = _micro_batches(args)
    batches = [next(data) for _ in range(count)]
    length = max(b["tokens"].shape[1] for b in batches)
    multiple = sequence_multiple(args)
    length = -(-length // multiple) * multiple
    return [shard_batch(_pad_to(b, length), context_parallel) for b in batches], length


def _forward_step(mode: str, context_parallel: ContextParallel | None):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        if context_parallel is not None:
            return output, cp_loss_function(mode, batch["loss_mask"], context_parallel)
        return output, loss_function(mode, batch["loss_mask"])

    return forward_step


def _reduce_loss(losses: list[dict]) -> float | None:
    """Objective value of the global batch from the micro-batch reports (last stage; None elsewhere)."""
    if not parallel_state.is_pipeline_last_stage():
        return None
    total = torch.stack([report["lm loss"] for report in losses]).sum(dim=0) if losses else torch.zeros(2)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1e-12)).item()


def _run_schedule(trainer: Trainer, data: Iterator[dict], forward_only: bool) -> tuple[float | None, int]:
    args = trainer.args
    batches, length = next_micro_batches(args, data, trainer.context_parallel)
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step(trainer.mode, trainer.context_parallel), data_iterator=iter(batches), model=[trainer.model],
        num_microbatches=len(batches), seq_length=length, micro_batch_size=args.micro_batch_size,
        forward_only=forward_only)
    return _reduce_loss(losses), length


def train_step(trainer: Trainer) -> tuple[float | None, float | None, bool, int]:
    """One iteration: forward/backward over the global batch, optimizer and schedule step.

    Returns (loss on the last rank else None, grad norm, whether the update happened, sequence length).
    """
    if not trainer.args.use_torch_fsdp2:
        trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    loss, length = _run_schedule(trainer, trainer.train_data, forward_only=False)
    updated, grad_norm, _ = trainer.optimizer.step()
    if updated:
        trainer.scheduler.step(increment=trainer.args.global_batch_size)
    return loss, grad_norm, updated, length


def evaluate(trainer: Trainer) -> float | None:
    """Mean objective over --eval-iters global batches of the validation data (last rank; None elsewhere)."""
    trainer.model.eval()
    values = []
    with torch.no_grad():
        for _ in range(trainer.args.eval_iters):
            loss, _ = _run_schedule(trainer, trainer.valid_data, forward_only=True)
            values.append(loss)
    trainer.model.train()
    return None if values[0] is None else sum(values) / len(values)


def _learning_rate(optimizer) -> float:
    groups = optimizer.param_groups
    plain = [g for g in groups if g.get("lr_mult", 1.0) == 1.0]
    return (plain or groups)[0]["lr"] / (plain or groups)[0].get("lr_mult", 1.0)


def _save(trainer: Trainer) -> None:
    overlapped = trainer.args.overlap_param_gather
    if overlapped:
        trainer.model.disable_forward_pre_hook(param_sync=True)
    if trainer.args.ckpt_format == "torch_dcp":
        save_dcp(trainer.args, trainer.state, trainer.stage, trainer.optimizer, trainer.scheduler)
    else:
        save_checkpoint(trainer.args.save, trainer.state, trainer.stage, trainer.optimizer, trainer.scheduler,
                        trainer.args)
    _print_last(f"saved checkpoint at iteration {trainer.state.iteration} to {trainer.args.save}")
    if overlapped:
        trainer.model.enable_forward_pre_hook()


@dataclass
class _Interval:
    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    skipped: int = 0
    nan: int = 0
    aux_sums: dict[str, float] = field(default_factory=dict)


def train(trainer: Trainer) -> None:
    """The iteration loop up to --train-iters (or --exit-interval), with logging, evaluation and saving."""
    args, state = trainer.args, trainer.state
    bar = ProgressBar(args.train_iters, enabled=_is_last_rank())
    board = TensorBoard(args.tensorboard_dir, enabled=_is_last_rank())
    interval = _Interval()
    while state.iteration < args.train_iters:
        loss, grad_norm, updated, length = train_step(trainer)
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        interval.iterations += 1
        interval.tokens += args.global_batch_size * length
        interval.skipped += int(not updated)
        for name, value in aux_loss_figures(args, _micro_batches(args)).items():
            interval.aux_sums[name] = interval.aux_sums.get(name, 0.0) + value
        if loss is not None:
            interval.nan += int(not np.isfinite(loss))
            interval.loss_sum += loss
        bar.update(state.iteration, loss)
        if state.iteration % args.tensorboard_log_interval == 0 and loss is not None:
            board.scalars(state.iteration, {"lm loss": loss, "learning-rate": _learning_rate(trainer.optimizer)})
        if state.iteration % args.log_interval == 0:
            seconds = time.perf_counter() - interval.start
            bar.clear()
            _print_last(iteration_line(IterationStats(
                iteration=state.iteration, train_iters=args.train_iters,
                consumed_samples=state.consumed_train_samples,
                elapsed_ms=1000.0 * seconds / interval.iterations, learning_rate=_learning_rate(trainer.optimizer),
                global_batch_size=args.global_batch_size, loss=interval.loss_sum / interval.iterations,
                grad_norm=grad_norm, tokens_per_second=interval.tokens / seconds,
                skipped_iterations=interval.skipped, nan_iterations=interval.nan,
                aux_losses={name: total / interval.iterations for name, total in interval.aux_sums.items()})))
            interval = _Interval()
        if trainer.valid_data is not None and args.eval_iters > 0 and state.iteration % args.eval_interval == 0:
            valid_loss = evaluate(trainer)
            if valid_loss is not None:
                _print_last(validation_line(state.iteration, valid_loss))
                board.scalars(state.iteration, {"validation lm loss": valid_loss})
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            _save(trainer)
        if args.exit_interval and state.iteration % args.exit_interval == 0:
            break
    if args.save and not (args.save_interval and state.iteration % args.save_interval == 0):
        _save(trainer)
    board.close()


def _report_inactive(args) -> None:
    used = ["--" + name.replace("_", "-") for name in INACTIVE_FLAGS if getattr(args, name)]
    if used and torch.distributed.get_rank() == 0:
        print(f"mm-train: accepted without effect here: {' '.join(used)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mm-train`` / ``python -m mm_train``; returns the exit status."""
    args = parse_args(argv)
    try:
        launch = read_launch()
        validate(args, launch)
    except ConfigError as error:
        print(f"mm-train: error: {error}", file=sys.stderr)
        return 2
    try:
        trainer = set_up(args, launch)
        _report_inactive(args)
        train(trainer)
    except (ConfigError, CheckpointError) as error:
        print(f"mm-train: error: {error}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
    return 0


def console_main() -> None:
    """The ``mm-train`` console script."""
    sys.exit(main())
