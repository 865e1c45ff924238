"""``--ckpt-format torch``: Megatron-LM's legacy checkpoint files, written atomically
(:func:`mm_train.checkpoint.atomic.save_atomically`) with our manifest beside them (every file's size and
SHA-256, the layout and the run's configuration, checked before a load).

Layout under ``--save`` (Megatron-LM's)::

    latest_checkpointed_iteration.txt               the newest complete iteration, replaced last
    iter_0000020/manifest.json                      ours: layout, iteration and the size of every file
    iter_0000020/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
    iter_0000020/mp_rank_TT[_PPP][_EEE]/distrib_optim.pt    with --use-distributed-optimizer

``TT`` is the tensor-parallel rank; ``_PPP`` the pipeline rank, only when PP > 1; ``_EEE`` the
expert-parallel rank, only when EP > 1. ``model_optim_rng.pt`` holds what Megatron-LM's
``generate_state_dict`` writes: ``args`` (the run as Megatron's Namespace), ``checkpoint_version`` 3.0,
``iteration``, ``model`` (``model0``, ``model1``, ... with virtual pipeline stages), ``optimizer`` and
``opt_param_scheduler`` (unless --no-save-optim), ``rng_state`` (a list with this rank's RNG states,
unless --no-save-rng) and ``num_floating_point_operations_so_far``, plus ``config`` (our run
configuration, plain values). ``distrib_optim.pt`` is megatron-core's gathered distributed-optimizer
state (``save_parameter_state``). One rank writes each directory (the first of the ranks holding the
same model shard); every data-parallel rank resumes from the same RNG states, as in Megatron-LM.

Megatron-LM loads these files (the local layer spec names the parameters alike), and this module loads
Megatron-LM's: its checkpoints have no manifest, and their ``args`` carry megatron-core classes that
:func:`mm_train.checkpoint.state.read_file` allows. RNG states only load on the kind of device that
saved them. Every file of this rank is read and checked on all ranks before anything is copied into the
model or optimizer; a problem is one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from mm_train.checkpoint import messages
from mm_train.checkpoint.atomic import (
    TRACKER,
    all_ranks_ok,
    iteration_dir,
    latest_iteration,
    save_atomically,
    verify_files,
)
from mm_train.checkpoint.manifest import MANIFEST
from mm_train.checkpoint.state import TrainingState, check_rng_state, read_file, rng_state, set_rng_state
from mm_train.errors import CheckpointError
from mm_train.features.checkpointing import CheckpointConfig, megatron_args

FORMAT_VERSION = 2
CHECKPOINT_VERSION = 3.0
MODEL_FILE = "model_optim_rng.pt"
OPTIMIZER_FILE = "distrib_optim.pt"


def rank_dir_name() -> str:
    """``mp_rank_TT``, with ``_PPP`` when PP > 1 and ``_EEE`` when EP > 1 (Megatron-LM's names)."""
    name = f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}"
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{parallel_state.get_pipeline_model_parallel_rank():03d}"
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        name += f"_{parallel_state.get_expert_model_parallel_rank():03d}"
    return name


def replica_rank() -> int:
    """This rank's index among the ranks holding the same model shard: its data x context-parallel rank, or
    with expert parallelism its rank among those holding the same experts. Rank 0 writes the shard."""
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        return parallel_state.get_expert_data_parallel_rank()
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def layout() -> dict[str, int]:
    """This run's TP, PP, DP (x CP) and EP sizes."""
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
            "ep": parallel_state.get_expert_model_parallel_world_size()}


def model_keys(stages: list) -> list[str]:
    """Megatron's keys of the model state: ``model``, or ``model0``, ``model1``, ... per virtual stage."""
    return ["model"] if len(stages) == 1 else [f"model{index}" for index in range(len(stages))]


def save_checkpoint(root: str, state: TrainingState, stages: list, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool, config_record: dict, vocab_size: int, flops: float) -> Path:
    """Writes iteration ``state.iteration`` under ``root`` atomically (collective over all ranks).

    stages: the unwrapped GPTModel of each (virtual) pipeline stage of this rank; ``config_record``: the
    run's configuration as plain values (stored as ``config`` and in Megatron's ``args``); ``vocab_size``:
    the model's padded vocabulary; ``flops``: floating-point operations of one iteration. Optimizer and
    scheduler are left out without ``options.save_optim``, RNG states without ``options.save_rng``.
    """
    args = megatron_args(config_record, consumed_train_samples=state.consumed_train_samples,
                         padded_vocab_size=vocab_size, ckpt_format="torch")

    def write(staging: Path) -> None:
        rank_dir = staging / rank_dir_name()
        rank_dir.mkdir(exist_ok=True)
        if options.save_optim and distributed_optimizer:  # collective over each optimizer's DP group
            optimizer.save_parameter_state(str(rank_dir / OPTIMIZER_FILE))
        if replica_rank() != 0:
            return
        payload = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": state.iteration}
        for key, stage in zip(model_keys(stages), stages, strict=True):
            payload[key] = stage.state_dict()
        if options.save_optim:
            payload["optimizer"] = optimizer.state_dict()
            payload["opt_param_scheduler"] = scheduler.state_dict()
        if options.save_rng:
            payload["rng_state"] = [rng_state(get_cuda_rng_tracker())]
        payload["num_floating_point_operations_so_far"] = flops * state.iteration
        payload["config"] = config_record
        torch.save(payload, rank_dir / MODEL_FILE)

    metadata = {"format_version": FORMAT_VERSION, "iteration": state.iteration, "layout": layout(),
                "config": config_record}
    return save_atomically(root, state.iteration, write, metadata)


def _check_layout(directory: Path, saved: dict) -> None:
    """TP, PP and EP as saved (the data-parallel size may differ: the optimizer file is gathered)."""
    current = layout()
    for key in ("tp", "pp", "ep"):
        if saved.get(key, 1) != current[key]:
            raise CheckpointError(f"{directory} was saved with {key.upper()}={saved.get(key, 1)}, this run has "
                                  f"{key.upper()}={current[key]} (--ckpt-format torch_dist loads at another layout)")


def _megatron_layout(main: dict, path: Path) -> dict[str, int]:
    """TP and PP of a checkpoint without our manifest, from its Megatron ``args``."""
    saved_args = main.get("args")
    try:
        return {"tp": int(saved_args.tensor_model_parallel_size), "pp": int(saved_args.pipeline_model_parallel_size),
                "ep": int(getattr(saved_args, "expert_model_parallel_size", 1) or 1)}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{path} has no Megatron args with the parallel sizes it was saved at") from None


def _check_model_state(saved: dict, model, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        if isinstance(tensor, torch.Tensor) and tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the model expects "
                                  f"{tuple(tensor.shape)}")


def _read(directory: Path, manifest: dict | None, stages: list, options: CheckpointConfig,
          distributed_optimizer: bool) -> dict:
    """This rank's model file, checked against the layout (the manifest's, or a Megatron-LM checkpoint's
    args) and the model."""
    if manifest is not None:
        _check_layout(directory, manifest.get("layout", {}))
    path = directory / rank_dir_name() / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {rank_dir_name()}/{MODEL_FILE} (saved at another parallel layout?)")
    main = read_file(path)
    if not isinstance(main, dict) or main.get("checkpoint_version", 0) < CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a Megatron checkpoint of version {CHECKPOINT_VERSION} or later")
    if manifest is None:
        if "config" in main:  # written by mm-train, which writes the manifest before publishing
            raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
        _check_layout(directory, _megatron_layout(main, path))
    resuming = not options.finetune
    for key, stage in zip(model_keys(stages), stages, strict=True):
        if key not in main:
            raise CheckpointError(f"{path} has no '{key}' (saved with another number of virtual pipeline stages?)")
        _check_model_state(main[key], stage, path)
    if resuming and options.load_optim:
        if "optimizer" not in main or "opt_param_scheduler" not in main:
            raise CheckpointError(f"{path} has no optimizer state (saved with --no-save-optim?); resume with "
                                  "--no-load-optim or --finetune")
        if distributed_optimizer and not (directory / rank_dir_name() / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{directory / rank_dir_name()} has no {OPTIMIZER_FILE} (saved without "
                                  "--use-distributed-optimizer?); resume with --no-load-optim")
    if resuming and options.load_rng:
        if not main.get("rng_state"):
            raise CheckpointError(f"{path} has no RNG state (saved with --no-save-rng?); resume with --no-load-rng")
        check_rng_state(_this_rank_rng(main), get_cuda_rng_tracker())
    return main


def _this_rank_rng(main: dict) -> dict:
    """This data-parallel rank's RNG state (Megatron keeps one per DP rank only with random init per rank)."""
    states = main["rng_state"]
    return states[parallel_state.get_data_parallel_rank()] if len(states) > 1 else states[0]


def _consumed_samples(main: dict) -> int:
    return int(getattr(main.get("args"), "consumed_train_samples", 0) or 0)


def _torch_adam_states(optimizer) -> list[dict]:
    return [inner.optimizer.state for inner in getattr(optimizer, "chained_optimizers", [optimizer])]


@contextlib.contextmanager
def adam_steps_set_aside(optimizer):
    """Takes torch Adam's per-parameter 'step' out of megatron's (distributed) optimizer states meanwhile,
    then puts back a copy for each parameter.

    megatron-core copies every key of a parameter's optimizer state from a checkpoint's parameter
    states, which hold no 'step' (torch's Adam keeps one per parameter; Apex's and Transformer Engine's
    do not): KeyError 'step'. The steps come from the optimizer's state dict, loaded before, where
    megatron gives all parameters one shared tensor; torch's Adam would then increment it once per
    parameter, hence a copy each."""
    states = _torch_adam_states(optimizer)
    steps = [{param: state.pop("step") for param, state in per.items() if "step" in state} for per in states]
    try:
        yield
    finally:
        for per, saved in zip(states, steps, strict=True):
            for param, step in saved.items():
                per[param]["step"] = step.clone()


def newest_checkpoint(root: str) -> tuple[int, Path, dict | None] | None:
    """The newest iteration under ``root`` (Megatron-LM's layout), its directory and its checked manifest
    (None for Megatron-LM's own checkpoints, which have none), after Megatron's loading line; None, after
    Megatron's warning, when there is none. A tracker naming a missing directory is a CheckpointError on
    every rank (collective)."""
    iteration = latest_iteration(root)
    if iteration is None:
        messages.no_checkpoint(root)
        return None
    directory = iteration_dir(root, iteration)
    messages.loading(root, iteration)
    if not directory.is_dir():
        all_ranks_ok(f"{root}/{TRACKER} names iteration {iteration} but {directory} does not exist")
    return iteration, directory, verify_files(directory, required=False)


@torch.no_grad()
def load_checkpoint(root: str, stages: list, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool) -> TrainingState | None:
    """Restores the newest checkpoint under ``root`` (collective); None, after Megatron's warning, when
    there is none.

    Without ``options.load_optim`` (--no-load-optim) optimizer and scheduler are skipped, without
    ``options.load_rng`` the RNG states; ``options.finetune`` loads the weights only and starts at
    iteration 0. Raises CheckpointError, on every rank, when any rank finds a problem; nothing has
    been modified then.
    """
    newest = newest_checkpoint(root)
    if newest is None:
        return None
    iteration, directory, manifest = newest
    error, main = None, {}
    try:
        main = _read(directory, manifest, stages, options, distributed_optimizer)
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    for key, stage in zip(model_keys(stages), stages, strict=True):
        stage.load_state_dict(main[key], strict=True)
    state = TrainingState()
    if not options.finetune:
        if options.load_optim:
            optimizer.load_state_dict(main["optimizer"])
            if distributed_optimizer:  # DP rank 0 reads the file and scatters it
                with adam_steps_set_aside(optimizer):
                    optimizer.load_parameter_state(str(directory / rank_dir_name() / OPTIMIZER_FILE))
            scheduler.load_state_dict(main["opt_param_scheduler"])
        if options.load_rng:
            set_rng_state(_this_rank_rng(main), get_cuda_rng_tracker())
        state = TrainingState(int(main["iteration"]), _consumed_samples(main))
    current = layout()
    messages.loaded(root, state.iteration, current["tp"], current["pp"])
    return state
