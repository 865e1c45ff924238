"""``--ckpt-format torch``: megatron-core model stages with megatron's optimizer, one directory per
iteration, written by :func:`mm_train.checkpoint.atomic.save_atomically`.

Layout under ``--save``::

    latest_checkpointed_iteration.txt        the newest complete iteration, replaced last
    iter_0000020/manifest.json               layout, iteration, run configuration, size and SHA-256
                                             of every file (:mod:`mm_train.checkpoint.manifest`)
    iter_0000020/mp_rank_TT_PPP/model_optim_rng.pt      model, optimizer, scheduler, iteration,
                                                        consumed samples, run configuration
                                                        (data x context rank 0)
    iter_0000020/mp_rank_TT_PPP/rank_state_dpDDD.pt     RNG states and distributed-optimizer shard
                                                        of data x context-parallel rank DDD

With expert parallelism the rank directories are ``mp_rank_TT_PPP_EEE`` (EEE: expert-parallel
rank), written by expert-data-parallel rank 0, since each EP rank holds different experts.

Loading checks every file against the manifest (sizes and checksums), then reads this rank's files
with ``torch.load(weights_only=True)`` and checks layout, keys and shapes on all ranks before anything
is copied into the model or optimizer; any problem is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from mm_train.checkpoint.atomic import (
    all_ranks_ok,
    iteration_dir,
    latest_iteration,
    save_atomically,
    verify_files,
)
from mm_train.checkpoint.state import TrainingState, rng_state, set_rng_state
from mm_train.errors import CheckpointError
from mm_train.features.checkpointing import CheckpointConfig

FORMAT_VERSION = 1


def _rank_dir_name() -> str:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    if parallel_state.get_expert_model_parallel_world_size() > 1:  # experts differ per EP rank
        return f"mp_rank_{tp:02d}_{pp:03d}_{parallel_state.get_expert_model_parallel_rank():03d}"
    return f"mp_rank_{tp:02d}_{pp:03d}"


def _dp_cp_rank() -> int:
    """This rank's index among the ranks holding the same model shard (data x context parallel)."""
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def _writes_model_file() -> bool:
    """One rank per model file: data x context rank 0, or with expert parallelism the first rank
    holding these experts."""
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        return parallel_state.get_expert_data_parallel_rank() == 0
    return _dp_cp_rank() == 0


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True)}


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _distributed_shards(optimizer) -> list[dict]:
    shards = []
    for inner in _optimizers(optimizer):
        state = inner.get_parameter_state_dp_reshardable()
        for dtype_state in (v for k, v in state.items() if isinstance(k, int)):
            for buckets in dtype_state.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry["padding"] = False  # the loader filters on this key; the getter omits it
        shards.append({"common": inner.state_dict(), "params": state})
    return shards


def save_checkpoint(root: str, state: TrainingState, model, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool, config_record: dict) -> Path:
    """Writes iteration ``state.iteration`` under ``root`` atomically (collective over all ranks).

    model: the unwrapped GPTModel stage of this rank; ``config_record``: the run's configuration as
    plain values, stored beside the weights and in the manifest. Optimizer state is left out without
    ``options.save_optim`` (--no-save-optim), RNG states without ``options.save_rng``.
    """

    def write(staging: Path) -> None:
        rank_dir = staging / _rank_dir_name()
        rank_dir.mkdir(exist_ok=True)
        if _writes_model_file():
            payload = {"format_version": FORMAT_VERSION, "iteration": state.iteration,
                       "consumed_train_samples": state.consumed_train_samples, "config": config_record,
                       "model": model.state_dict(), "opt_param_scheduler": scheduler.state_dict()}
            if options.save_optim and not distributed_optimizer:
                payload["optimizer"] = optimizer.state_dict()
            torch.save(payload, rank_dir / "model_optim_rng.pt")
        rank_state = {}
        if options.save_rng:
            rank_state["rng"] = rng_state(get_cuda_rng_tracker())
        if options.save_optim and distributed_optimizer:
            rank_state["distributed_optimizer"] = _distributed_shards(optimizer)
        torch.save(rank_state, rank_dir / f"rank_state_dp{_dp_cp_rank():03d}.pt")

    metadata = {"format_version": FORMAT_VERSION, "iteration": state.iteration, "layout": _layout(),
                "config": config_record}
    return save_atomically(root, state.iteration, write, metadata)


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def _check_layout(manifest: dict, directory: Path, check_dp: bool) -> None:
    layout, current = manifest.get("layout", {}), _layout()
    for key in ("tp", "pp", "dp") if check_dp else ("tp", "pp"):
        if layout.get(key) != current[key]:
            raise CheckpointError(f"{directory} was saved with {key.upper()}={layout.get(key)}, this run has "
                                  f"{key.upper()}={current[key]}")


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


def _read_rank_files(directory: Path, manifest: dict, model, options: CheckpointConfig,
                     distributed_optimizer: bool) -> tuple[dict, dict]:
    # Distributed-optimizer shards belong to their data-parallel rank: loading them needs the same DP size.
    _check_layout(manifest, directory, check_dp=distributed_optimizer and options.load_optim)
    rank_dir = directory / _rank_dir_name()
    main_path = rank_dir / "model_optim_rng.pt"
    main = _load_file(main_path)
    if main.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{main_path} has format version {main.get('format_version')}, expected {FORMAT_VERSION}")
    _check_model_state(main["model"], model, main_path)
    rank_path = rank_dir / f"rank_state_dp{_dp_cp_rank():03d}.pt"
    rank_state = {}
    if not options.finetune and rank_path.exists():
        rank_state = _load_file(rank_path)
    return main, rank_state


def _unshare_adam_steps(torch_optimizer) -> None:
    # Without Apex/TE, DistributedOptimizer.load_state_dict gives every parameter's state one shared
    # 'step' tensor; torch Adam then increments it once per parameter and the bias correction drifts.
    for state in torch_optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()


@torch.no_grad()
def _apply_optimizer(main: dict, rank_state: dict, optimizer, directory: Path, distributed_optimizer: bool) -> None:
    if distributed_optimizer:
        shards = rank_state.get("distributed_optimizer")
        if shards is None:
            raise CheckpointError(f"{directory} has no distributed-optimizer state (saved with --no-save-optim?); "
                                  "use --no-load-optim")
        for inner, shard in zip(_optimizers(optimizer), shards, strict=True):
            inner.load_state_dict(shard["common"])
            inner.load_parameter_state_from_dp_reshardable(shard["params"])
            _unshare_adam_steps(inner.optimizer)
        return
    if "optimizer" not in main:
        raise CheckpointError(f"{directory} has no optimizer state (saved with --no-save-optim?); use --no-load-optim")
    optimizer.load_state_dict(main["optimizer"])


def load_checkpoint(root: str, model, optimizer, scheduler, options: CheckpointConfig,
                    distributed_optimizer: bool) -> TrainingState:
    """Restores the newest checkpoint under ``root`` (collective); a fresh TrainingState when there is none.

    Without ``options.load_optim`` (--no-load-optim) optimizer and scheduler are skipped, without
    ``options.load_rng`` the RNG states; ``options.finetune`` loads the weights only and starts at
    iteration 0. Raises CheckpointError, on every rank, when any rank finds a problem in the files
    (nothing has been modified then) or when the schedule differs from the checkpoint's
    (:class:`mm_train.optim.ScaledParamScheduler`).
    """
    iteration = latest_iteration(root)
    if iteration is None:
        return TrainingState()
    directory = iteration_dir(root, iteration)
    manifest = verify_files(directory)
    error, main, rank_state = None, {}, {}
    try:
        main, rank_state = _read_rank_files(directory, manifest, model, options, distributed_optimizer)
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    model.load_state_dict(main["model"], strict=True)
    if options.finetune:
        return TrainingState()
    if options.load_optim:
        _apply_optimizer(main, rank_state, optimizer, directory, distributed_optimizer)
        scheduler.load_state_dict(main["opt_param_scheduler"])
    if options.load_rng and "rng" in rank_state:
        set_rng_state(rank_state["rng"], get_cuda_rng_tracker())
    return TrainingState(main["iteration"], main["consumed_train_samples"])
