"""``--ckpt-format torch`` checkpoints: one directory per iteration, written atomically.

Layout under ``--save``::

    latest_checkpointed_iteration.txt        the newest complete iteration, replaced last
    iter_0000020/manifest.json               layout, iteration and the size of every file
    iter_0000020/mp_rank_TT_PPP/model_optim_rng.pt      model, optimizer, scheduler, iteration,
                                                        consumed samples (data x context rank 0)
    iter_0000020/mp_rank_TT_PPP/rank_state_dpDDD.pt     RNG states and distributed-optimizer shard
                                                        of data x context-parallel rank DDD

With expert parallelism the rank directories are ``mp_rank_TT_PPP_EEE`` (EEE: expert-parallel
rank), written by expert-data-parallel rank 0, since each EP rank holds different experts.

Every rank writes into ``iter_0000020.tmp``; after a barrier rank 0 writes the manifest,
renames the directory and then replaces the marker file, so a crash leaves either the old
checkpoint or the new one, never a half one under the marker. Loading reads every file of
this rank with ``torch.load(weights_only=True)`` and checks manifest, sizes, layout, keys and
shapes on all ranks before anything is copied into the model or optimizer; any problem is a
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, partial, corrupt, or from another layout)."""


@dataclass
class TrainingState:
    """What a checkpoint restores besides weights: the iteration and the data position."""

    iteration: int = 0
    consumed_train_samples: int = 0


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``root/iter_0000020`` for iteration 20."""
    return Path(root) / f"iter_{iteration:07d}"


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


def rng_state(tracker=None) -> dict:
    """Python, numpy, torch (and accelerator) RNG states, plus ``tracker.get_states()`` when a
    Megatron RNG tracker is given; tensors and plain values only (loadable with weights_only)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if tracker is not None:
        state["tracker"] = tracker.get_states()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, tracker=None) -> None:
    """Restores what :func:`rng_state` returned; with ``tracker``, its states too (CheckpointError
    when the saved state has none)."""
    if tracker is not None and "tracker" not in state:
        raise CheckpointError("the checkpoint has no RNG tracker states; pass --no-load-rng")
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if tracker is not None:
        tracker.set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}


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


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """torch.distributed.barrier() when a process group exists (single-process use needs none)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def start_staging(root: str | Path, iteration: int) -> tuple[Path, Path]:
    """(final, staging) directories of ``iteration``: rank 0 recreates an empty ``iter_N.tmp``,
    then all ranks meet (collective)."""
    final = iteration_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    return final, staging


def publish(root: str | Path, staging: Path, final: Path, iteration: int) -> None:
    """Rank 0 only, after every rank has written into ``staging``: renames it to ``final``
    (replacing an older copy) and then atomically rewrites the latest-iteration marker."""
    previous = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    tracker = Path(root) / TRACKER
    _fsync_write(tracker.with_name(TRACKER + ".tmp"), str(iteration))
    os.replace(tracker.with_name(TRACKER + ".tmp"), tracker)


def save_checkpoint(root: str, state: TrainingState, model, optimizer, scheduler, args) -> Path:
    """Writes iteration ``state.iteration`` under ``root`` atomically (collective over all ranks).

    model: the unwrapped GPTModel stage of this rank. Optimizer state is left out with
    --no-save-optim, RNG states with --no-save-rng.
    """
    final, staging = start_staging(root, state.iteration)
    rank_dir = staging / _rank_dir_name()
    rank_dir.mkdir(exist_ok=True)
    distributed = args.use_distributed_optimizer
    if _writes_model_file():
        payload = {"format_version": FORMAT_VERSION, "iteration": state.iteration,
                   "consumed_train_samples": state.consumed_train_samples, "args": _plain_args(args),
                   "model": model.state_dict(), "opt_param_scheduler": scheduler.state_dict()}
        if not args.no_save_optim and not distributed:
            payload["optimizer"] = optimizer.state_dict()
        torch.save(payload, rank_dir / "model_optim_rng.pt")
    rank_state = {}
    if not args.no_save_rng:
        rank_state["rng"] = rng_state(get_cuda_rng_tracker())
    if not args.no_save_optim and distributed:
        rank_state["distributed_optimizer"] = _distributed_shards(optimizer)
    torch.save(rank_state, rank_dir / f"rank_state_dp{_dp_cp_rank():03d}.pt")
    barrier()
    if _rank() == 0:
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*.pt"))}
        manifest = {"format_version": FORMAT_VERSION, "iteration": state.iteration, "layout": _layout(),
                    "files": files}
        _fsync_write(staging / MANIFEST, json.dumps(manifest, indent=1))
        publish(root, staging, final, state.iteration)
    barrier()
    return final


def latest_iteration(root: str) -> int | None:
    """The iteration named by the marker file under ``root``; None when there is no marker."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration number, found {text[:40]!r}")
    return int(text)


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def _check_manifest(directory: Path, args) -> None:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, layout = manifest["files"], manifest["layout"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt: {error}") from None
    current = _layout()
    keys = ("tp", "pp", "dp") if args.use_distributed_optimizer and not args.no_load_optim else ("tp", "pp")
    for key in keys:
        if layout.get(key) != current[key]:
            raise CheckpointError(f"{directory} was saved with {key.upper()}={layout.get(key)}, this run has "
                                  f"{key.upper()}={current[key]}")
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is partial: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} is truncated or changed: {path.stat().st_size} bytes, manifest says {size}")


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


def _read_rank_files(directory: Path, model, args) -> tuple[dict, dict]:
    _check_manifest(directory, args)
    rank_dir = directory / _rank_dir_name()
    main_path = rank_dir / "model_optim_rng.pt"
    main = _load_file(main_path)
    if main.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{main_path} has format version {main.get('format_version')}, expected {FORMAT_VERSION}")
    _check_model_state(main["model"], model, main_path)
    rank_path = rank_dir / f"rank_state_dp{_dp_cp_rank():03d}.pt"
    rank_state = {}
    if not args.finetune and rank_path.exists():
        rank_state = _load_file(rank_path)
    return main, rank_state


def all_ranks_ok(error: str | None) -> None:
    """Raises CheckpointError on every rank when any rank reports an ``error`` (so no rank is left
    waiting in a later collective); a rank's own error is raised as is, another's names that rank."""
    errors = [error]
    if torch.distributed.is_initialized():
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    if error is not None:
        raise CheckpointError(error)
    failures = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failures:
        rank, message = failures[0]
        raise CheckpointError(f"rank {rank}: {message}")


def _unshare_adam_steps(torch_optimizer) -> None:
    # Without Apex/TE, DistributedOptimizer.load_state_dict gives every parameter's state one shared
    # 'step' tensor; torch Adam then increments it once per parameter and the bias correction drifts.
    for state in torch_optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()


@torch.no_grad()
def _apply_optimizer(main: dict, rank_state: dict, optimizer, directory: Path, args) -> None:
    if args.use_distributed_optimizer:
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


def load_checkpoint(root: str, model, optimizer, scheduler, args) -> TrainingState:
    """Restores the newest checkpoint under ``root`` (collective); a fresh TrainingState when there is none.

    --no-load-optim skips optimizer and scheduler, --no-load-rng the RNG states, --finetune
    loads the weights only and starts at iteration 0. Raises CheckpointError, on every rank,
    when any rank finds a problem; nothing has been modified then.
    """
    iteration = latest_iteration(root)
    if iteration is None:
        return TrainingState()
    directory = iteration_dir(root, iteration)
    error, main, rank_state = None, {}, {}
    try:
        if not directory.is_dir():
            raise CheckpointError(f"{root}/{TRACKER} names iteration {iteration} but {directory} does not exist")
        main, rank_state = _read_rank_files(directory, model, args)
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    model.load_state_dict(main["model"], strict=True)
    if args.finetune:
        return TrainingState()
    if not args.no_load_optim:
        _apply_optimizer(main, rank_state, optimizer, directory, args)
        scheduler.load_state_dict(main["opt_param_scheduler"])
    if not args.no_load_rng and "rng" in rank_state:
        set_rng_state(rank_state["rng"], get_cuda_rng_tracker())
    return TrainingState(main["iteration"], main["consumed_train_samples"])
