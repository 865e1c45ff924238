"""The parallel layout and the process group: tensor, pipeline (with the interleaved schedule of virtual
stages) and data parallelism, sequence parallelism, megatron-core's DDP options (distributed optimizer, overlapped gradient reduction and
parameter gathering, bucket size), the process-group backend and timeout, and the environment
variables of the reference that concern them (HCCL_CONNECT_TIMEOUT, CUDA_DEVICE_MAX_CONNECTIONS).

The backend is the device's (gloo, nccl, hccl). Launch scripts say ``--distributed-backend nccl`` on
any machine: on Ascend that is HCCL (as MindSpeed does), and on a machine without an accelerator the run
goes on gloo with one warning line.

Context and expert parallelism have their own features (:mod:`mm_train.features.context_parallel`,
:mod:`mm_train.features.moe`); the data-parallel size is what the three leave of the world.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import timedelta

from mm_train.errors import ConfigError
from mm_train.features import fields_from, non_negative_int, positive_int
from mm_train.launch import Launch, int_env

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class ParallelConfig:
    """Sizes (world = TP x PP x CP x DP), megatron-core DDP options, and the process group's
    backend and collective timeout (``distributed_timeout_minutes`` is megatron's own groups')."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    ddp_bucket_size: int | None
    distributed_backend: str
    distributed_timeout_minutes: int
    timeout: timedelta
    virtual_pipeline_model_parallel_size: int | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the TP/PP/SP sizes, the DDP options and the process-group flags."""
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--overlap-param-gather", action="store_true")
    group.add_argument("--ddp-bucket-size", type=positive_int, default=None,
                       help="gradient bucket size in elements (default: megatron-core's)")
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=positive_int, default=None,
                       help="interleaved pipeline schedule: layers per virtual stage (Megatron)")
    group.add_argument("--virtual-pipeline-model-parallel-size", type=positive_int, default=None,
                       help="interleaved pipeline schedule: virtual stages per pipeline rank (MindSpeed-MM)")
    group.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo", "hccl"],
                       help="default: hccl on NPU, nccl on CUDA, gloo on CPU; nccl means hccl on NPU and gloo "
                            "without an accelerator")
    group.add_argument("--distributed-timeout-minutes", type=positive_int, default=10)
    group.add_argument("--local-rank", "--local_rank", dest="local_rank", type=non_negative_int, default=None,
                       help="set by python -m torch.distributed.launch; LOCAL_RANK wins when set")


def check_layout(args: argparse.Namespace, world_size: int) -> int:
    """The TP x PP x CP layout against the world size and the model's layers and heads; returns the
    data-parallel size."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp}")
    if args.num_layers % pp:
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by TP {tp}")
    return world_size // (tp * pp * cp)


def fill_defaults(args: argparse.Namespace) -> None:
    """Sequence parallelism means nothing without tensor parallelism: off at TP 1. The virtual pipeline
    size from --num-layers-per-virtual-pipeline-stage (layers per rank / layers per virtual stage)."""
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False
    per_stage = args.num_layers_per_virtual_pipeline_stage
    if per_stage is not None and args.virtual_pipeline_model_parallel_size is None:
        per_rank = args.num_layers // args.pipeline_model_parallel_size
        if per_rank % per_stage:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_stage} does not divide the "
                              f"{per_rank} layers of each pipeline rank")
        args.virtual_pipeline_model_parallel_size = per_rank // per_stage


def check(args: argparse.Namespace) -> None:
    """Model widths TP must divide (after the model defaults), and the DDP options' dependencies."""
    tp = args.tensor_model_parallel_size
    if args.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {args.num_query_groups} is not divisible by TP {tp}")
    if args.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by TP {tp}")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce")
    _check_virtual_pipeline(args)


def _check_virtual_pipeline(args: argparse.Namespace) -> None:
    vpp, pp = args.virtual_pipeline_model_parallel_size, args.pipeline_model_parallel_size
    if vpp is None:
        return
    if pp < 2:
        raise ConfigError("the interleaved pipeline schedule (virtual pipeline stages) needs "
                          "--pipeline-model-parallel-size >= 2")
    if (args.num_layers // pp) % vpp:
        raise ConfigError(f"--virtual-pipeline-model-parallel-size {vpp} does not divide the {args.num_layers // pp} "
                          "layers of each pipeline rank")


def check_environment(args: argparse.Namespace, launch: Launch) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS: an integer in [1, 32], and 1 with sequence parallel or overlapped
    gradient reduction with TP > 1 on an accelerator (the ordering of TP communication relies on it);
    HCCL_CONNECT_TIMEOUT in range; a backend the device has."""
    value = int_env("CUDA_DEVICE_MAX_CONNECTIONS", 1, 32)
    overlapping = args.sequence_parallel or (args.overlap_grad_reduce and args.tensor_model_parallel_size > 1)
    if overlapping and value is not None and value != 1:
        raise ConfigError(f"CUDA_DEVICE_MAX_CONNECTIONS={value} must be 1 with --sequence-parallel or "
                          "--overlap-grad-reduce under tensor parallelism")
    if overlapping and value is None and launch.device_type != "cpu":
        raise ConfigError("set CUDA_DEVICE_MAX_CONNECTIONS=1 for --sequence-parallel or --overlap-grad-reduce "
                          "under tensor parallelism")
    _timeout(args)
    _backend(args, launch)


def _timeout(args: argparse.Namespace) -> timedelta:
    """HCCL_CONNECT_TIMEOUT seconds (an integer in [120, 7200]) if set, else --distributed-timeout-minutes."""
    seconds = int_env("HCCL_CONNECT_TIMEOUT", 120, 7200)
    if seconds is not None:
        return timedelta(seconds=seconds)
    return timedelta(minutes=args.distributed_timeout_minutes)


def _backend(args: argparse.Namespace, launch: Launch) -> str:
    """The backend of the device: --distributed-backend gloo as asked, nccl or hccl mean the device's own;
    hccl on a CUDA machine is refused."""
    requested, native = args.distributed_backend, BACKENDS[launch.device_type]
    if requested is None or requested == "gloo":
        return requested or native
    if requested == "hccl" and launch.device_type == "cuda":
        raise ConfigError("--distributed-backend hccl needs Ascend NPUs; this machine has CUDA GPUs (use nccl)")
    return native


def notices(args: argparse.Namespace, launch: Launch) -> list[str]:
    """The warning line when --distributed-backend names an accelerator's backend on a machine without one."""
    if launch.device_type == "cpu" and args.distributed_backend in ("nccl", "hccl"):
        return [f"warning: --distributed-backend {args.distributed_backend} needs an accelerator and this machine "
                "has none: running on gloo"]
    return []


def to_config(args: argparse.Namespace, launch: Launch, data_parallel_size: int) -> ParallelConfig:
    """The :class:`ParallelConfig` of the (checked) flags and environment."""
    return fields_from(ParallelConfig, args, world_size=launch.world_size, data_parallel_size=data_parallel_size,
                       distributed_backend=_backend(args, launch), timeout=_timeout(args))


def initialize_model_parallel(parallel: ParallelConfig, context_parallel_size: int,
                              expert_model_parallel_size: int, experts: bool) -> None:
    """megatron-core's parallel state for this layout (a collective over all ranks); expert tensor
    parallelism is 1 when the model has experts."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size, expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=1 if experts else None,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes)
