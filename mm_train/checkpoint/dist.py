"""``--ckpt-format torch_dist``: megatron-core's ``dist_checkpointing`` (Megatron-LM's default format),
written atomically (:func:`mm_train.checkpoint.atomic.save_atomically`) with our manifest beside it.

Layout under ``--save``::

    latest_checkpointed_iteration.txt     the newest complete iteration, replaced last
    iter_0000020/manifest.json            ours: layout, iteration and the size of every file
    iter_0000020/metadata.json, .metadata, common.pt, __<rank>_<n>.distcp    megatron-core's files

Every parameter is a sharded tensor with its global shape and this rank's offsets (global layer
numbers under pipeline parallelism), so a checkpoint loads at another TP, PP (virtual stages included)
and DP layout: each rank reads the slices it holds. Megatron's distributed optimizer is saved
``fully_reshardable`` (its state per parameter, like a plain optimizer's), so it reshards as well.
``common.pt`` holds Megatron-LM's non-sharded entries (``args``, ``checkpoint_version``, ``iteration``,
``opt_param_scheduler``, ``num_floating_point_operations_so_far``) and our ``config``. RNG states are
saved per (PP, TP, EP) rank and restored only at the same layout (otherwise a line says they are
ignored, as Megatron-LM does).
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from mm_train.checkpoint import messages
from mm_train.checkpoint.atomic import (
    all_ranks_ok,
    save_atomically,
)
from mm_train.checkpoint.manifest import MANIFEST
from mm_train.checkpoint.state import TrainingState, check_rng_state, rng_state, set_rng_state
from mm_train.checkpoint.torch_format import (
    CHECKPOINT_VERSION,
    adam_steps_set_aside,
    layout,
    model_keys,
    newest_checkpoint,
    replica_rank,
)
from mm_train.errors import CheckpointError, first_line
from mm_train.features.checkpointing import CheckpointConfig, megatron_args
from mm_train.launch import print_rank_0

FORMAT_VERSION = 1
OPTIMIZER_SHARDING = "fully_reshardable"
# How megatron's distributed optimizer loads each way of saving its state (Megatron-LM saves dp_reshardable).
_PARAMETER_STATE_LOADERS = {
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_sharded_model_space": "load_parameter_state_from_fs_model_space",
    "dp_zero_gather_scatter": "load_parameter_state_from_dp_zero",
}


def _metadata(distributed_optimizer: bool, sharding: str = OPTIMIZER_SHARDING) -> dict:
    """What megatron-core's ``sharded_state_dict`` methods are told about the format (Megatron-LM's keys)."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = sharding
    return metadata


def _load_optimizer(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)`` for megatron's optimizer; the distributed optimizer's parameter
    states with torch Adam's steps set aside (:func:`~mm_train.checkpoint.torch_format.adam_steps_set_aside`)."""
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    parts = [state] if len(inners) == 1 else [part for _, part in sorted(state.items())]
    for inner, part in zip(inners, parts, strict=True):
        if "param_state" not in part:
            inner.load_state_dict(part)
            continue
        parameters, sharding = part.pop("param_state"), part.pop("param_state_sharding_type")
        inner.load_state_dict(part)
        with adam_steps_set_aside(inner):
            getattr(inner, _PARAMETER_STATE_LOADERS[sharding])(parameters)


def _rng_object(state: list | None) -> ShardedObject:
    """This rank's RNG states as a sharded object keyed by its (PP, TP, EP) position."""
    current = layout()
    return ShardedObject("rng_state", state, (current["pp"], current["tp"], current["ep"]),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_expert_model_parallel_rank()),
                         replica_id=replica_rank())


def _init_torch_adam_states(optimizer) -> None:
    """Gives a fresh torch Adam under megatron's distributed optimizer its states (step 0, zero moments),
    which the load overwrites: building the sharded state dict to load into calls megatron-core's
    DistributedOptimizer.state_dict, which needs one 'step' per parameter with torch's Adam (an
    AssertionError on an optimizer that has not stepped yet)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        if not isinstance(adam, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                             exp_avg_sq=torch.zeros_like(param))


def _sharded_model(stages: list, metadata: dict) -> dict:
    return {key: stage.sharded_state_dict(metadata=metadata) for key, stage in zip(model_keys(stages), stages,
                                                                                    strict=True)}


def save_checkpoint(root: str, state: TrainingState, stages: list, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool, config_record: dict, vocab_size: int, flops: float) -> Path:
    """Writes iteration ``state.iteration`` under ``root`` atomically (collective over all ranks); the
    arguments are those of :func:`mm_train.checkpoint.torch_format.save_checkpoint`."""
    saved_layout = layout()
    sharding = _metadata(distributed_optimizer)
    common = {"args": megatron_args(config_record, consumed_train_samples=state.consumed_train_samples,
                                    padded_vocab_size=vocab_size, ckpt_format="torch_dist"),
              "checkpoint_version": CHECKPOINT_VERSION, "iteration": state.iteration,
              "num_floating_point_operations_so_far": flops * state.iteration, "config": config_record,
              "layout": saved_layout}

    def write(staging: Path) -> None:
        sharded = {**common, **_sharded_model(stages, sharding)}
        if options.save_optim:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=False, metadata=sharding)
            sharded["opt_param_scheduler"] = scheduler.state_dict()
        if options.save_rng:
            sharded["rng_state"] = _rng_object([rng_state(get_cuda_rng_tracker())])
        dist_checkpointing.save(sharded, str(staging), content_metadata=sharding)

    manifest = {"format_version": FORMAT_VERSION, "iteration": state.iteration, "layout": saved_layout,
                "config": config_record}
    return save_atomically(root, state.iteration, write, manifest)


def _read_common(directory: Path, manifest: dict | None) -> dict:
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise CheckpointError(f"{directory} is not a torch_dist checkpoint (saved with another --ckpt-format?)")
    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as error:
        raise CheckpointError(f"{directory}/common.pt: unreadable ({type(error).__name__})") from None
    if common.get("checkpoint_version", 0) < CHECKPOINT_VERSION:
        raise CheckpointError(f"{directory} is not a Megatron checkpoint of version {CHECKPOINT_VERSION} or later")
    if manifest is None and "config" in common:  # written by mm-train, which writes the manifest before publishing
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
    return common


def _saved_layout(common: dict) -> dict[str, int]:
    if "layout" in common:
        return common["layout"]
    saved_args = common.get("args")
    return {"tp": getattr(saved_args, "tensor_model_parallel_size", None),
            "pp": getattr(saved_args, "pipeline_model_parallel_size", None),
            "ep": getattr(saved_args, "expert_model_parallel_size", 1) or 1}


@torch.no_grad()
def load_checkpoint(root: str, stages: list, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool) -> TrainingState | None:
    """Restores the newest checkpoint under ``root`` at this run's layout (collective); None, after
    Megatron's warning, when there is none. The flags' meaning is that of
    :func:`mm_train.checkpoint.torch_format.load_checkpoint`."""
    newest = newest_checkpoint(root)
    if newest is None:
        return None
    iteration, directory, manifest = newest
    error, common = None, {}
    try:
        common = _read_common(directory, manifest)
        resuming = not options.finetune
        if resuming and options.load_optim and "opt_param_scheduler" not in common:
            raise CheckpointError(f"{directory} has no optimizer state (saved with --no-save-optim?); resume with "
                                  "--no-load-optim or --finetune")
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    resuming = not options.finetune
    saved, current = _saved_layout(common), layout()
    same_layout = all(saved.get(key) == current[key] for key in ("tp", "pp", "ep"))
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    metadata = _metadata(distributed_optimizer, content.get("distrib_optim_sharding_type", OPTIMIZER_SHARDING))
    sharded = _sharded_model(stages, metadata)
    if resuming and options.load_optim:
        if distributed_optimizer:
            _init_torch_adam_states(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=True, metadata=metadata)
    load_rng = resuming and options.load_rng
    if load_rng and same_layout:
        sharded["rng_state"] = _rng_object(None)
    elif load_rng:
        print_rank_0(f"(TP, PP, EP) mismatch after resume ({(current['tp'], current['pp'], current['ep'])} vs "
                     f"{(saved.get('tp'), saved.get('pp'), saved.get('ep'))} from checkpoint): RNG state will be "
                     "ignored")
    try:
        loaded = dist_checkpointing.load(sharded, str(directory), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except Exception as failure:
        raise CheckpointError(f"{directory}: cannot load at this layout: {first_line(failure)}") from failure
    if "rng_state" in loaded:
        all_ranks_ok(_rng_problem(loaded["rng_state"]))
    for key, stage in zip(model_keys(stages), stages, strict=True):
        stage.load_state_dict(loaded[key], strict=True)
    state = TrainingState()
    if resuming:
        if options.load_optim:
            _load_optimizer(optimizer, loaded["optimizer"])
            scheduler.load_state_dict(common["opt_param_scheduler"])
        if "rng_state" in loaded:
            set_rng_state(loaded["rng_state"][0], get_cuda_rng_tracker())
        state = TrainingState(int(common["iteration"]), int(getattr(common["args"], "consumed_train_samples", 0)))
    messages.loaded(root, state.iteration, current["tp"], current["pp"])
    return state


def _rng_problem(states: list) -> str | None:
    try:
        check_rng_state(states[0], get_cuda_rng_tracker())
    except CheckpointError as error:
        return str(error)
    return None
