"""The typed configuration of a run: the command line turned once, after every check, into frozen
dataclasses (one per feature, :mod:`mm_train.features`). Nothing below the command line reads the
argparse Namespace; it reads a :class:`RunConfig`."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch

from mm_train.features import (
    allocator,
    checkpointing,
    compat,
    context_parallel,
    data,
    fsdp2,
    fused_kernels,
    logging,
    model,
    moe,
    multimodal,
    optimizer,
    parallel,
    precision,
    recompute,
    resilience,
    training,
)
from mm_train.launch import Launch

# Every feature of the command line, in the order of the --help groups.
FEATURES = (model, precision, training, optimizer, recompute, parallel, fused_kernels, allocator, checkpointing,
            resilience, logging, data, fsdp2, context_parallel, moe, multimodal, compat)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run is configured with (see each feature module for its fields). ``notices``: the
    lines printed at start-up (flags without effect here and why, substitutions such as gloo for nccl)."""

    model: model.ModelConfig
    precision: precision.PrecisionConfig
    training: training.TrainingConfig
    optimizer: optimizer.OptimizerConfig
    parallel: parallel.ParallelConfig
    context_parallel: context_parallel.ContextParallelConfig
    moe: moe.MoEConfig | None
    fsdp2: fsdp2.FSDP2Settings | None
    fused_kernels: fused_kernels.FusedKernelsConfig
    allocator: allocator.AllocatorConfig
    recompute: recompute.RecomputeConfig
    data: data.DataConfig
    checkpoint: checkpointing.CheckpointConfig
    resilience: resilience.ResilienceConfig
    logging: logging.LoggingConfig
    multimodal: multimodal.MultimodalConfig | None = None
    notices: tuple[str, ...] = ()

    def record(self) -> dict:
        """This configuration as plain values (dicts, lists, str, numbers, None), e.g. for a checkpoint
        (the start-up notices left out)."""
        record = _plain(dataclasses.asdict(self))
        record.pop("notices")
        return record


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def build_config(args: argparse.Namespace, launch: Launch) -> RunConfig:
    """Checks every flag against the others and the environment, fills the derived defaults, and
    returns the typed configuration. Raises ConfigError with a one-line message on the first problem.

    ``args`` is updated in place with the derived defaults (it is not used afterwards).
    """
    world = launch.world_size
    compat.check(args)
    model.check_required(args)
    files = multimodal.read_files(args)
    ignored = multimodal.fill_defaults(args, files) if files is not None else ()
    if files is None:
        fsdp2.check(args, world)
    else:
        multimodal.check(args, files, world)
    data_parallel_size = parallel.check_layout(args, world)
    model.fill_defaults(args)
    parallel.fill_defaults(args)
    training.fill_defaults(args, data_parallel_size)
    model.check(args)
    parallel.check(args)
    precision.check(args)
    fused_kernels.check(args)
    context_parallel.check(args)
    training.check(args, data_parallel_size)
    optimizer.check(args)
    recompute.check(args)
    if files is None:
        moe.check(args, world // args.pipeline_model_parallel_size)
    data.check(args)
    checkpointing.check(args)
    logging.check(args)
    parallel.check_environment(args, launch)
    cp = context_parallel.to_config(args)
    pad_multiple = context_parallel.sequence_multiple(cp, args.tensor_model_parallel_size, args.sequence_parallel)
    return RunConfig(
        model=model.to_config(args),
        precision=precision.to_config(args),
        training=training.to_config(args, data_parallel_size),
        optimizer=optimizer.to_config(args),
        parallel=parallel.to_config(args, launch, data_parallel_size),
        context_parallel=cp,
        moe=moe.to_config(args),
        fsdp2=fsdp2.to_config(args, world) if files is None else multimodal.fsdp2_settings(args, world),
        fused_kernels=fused_kernels.to_config(args, launch.device_type),
        allocator=allocator.to_config(args),
        recompute=recompute.to_config(args),
        data=data.to_config(args, pad_multiple),
        checkpoint=checkpointing.to_config(args),
        resilience=resilience.to_config(args),
        logging=logging.to_config(args),
        multimodal=multimodal.to_config(args, files) if files is not None else None,
        notices=tuple(compat.notices(args) + multimodal.notices(ignored) + parallel.notices(args, launch)
                      + context_parallel.notices(args) + model.notices(args)
                      + fused_kernels.notices(args, launch.device_type) + moe.notices(args)),
    )
