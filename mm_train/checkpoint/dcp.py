"""``--ckpt-format torch_dcp``: sharded checkpoints with torch.distributed.checkpoint.

Layout of ``<dir>``::

    latest_checkpointed_iteration.txt    the last complete iteration, written last
    iter_0000010/
        .metadata, __*_*.distcp          model ("model.*") and optimizer ("optim.*") via DCP
        common.pt                        iteration, consumed samples, scheduler, world size
        rng_rank_<r>.pt                  RNG states of rank r, in Megatron's layout
                                         (:func:`mm_train.checkpoint.state.rng_state`)
        manifest.json                    size and SHA-256 of every file, iteration, metadata

Model and optimizer state come from torch.distributed.checkpoint.state_dict, keyed by global
parameter names, so a checkpoint written by FSDP2 at one world size loads into another world
size or into an unsharded model (DCP reshards). RNG states are per rank and only load at the
world size they were saved at. A save is atomic (:func:`mm_train.checkpoint.atomic.save_atomically`);
a load first checks every file against the manifest (:func:`mm_train.checkpoint.atomic.verify_files`).
Files are read with ``torch.load(weights_only=True)``. Loading prints Megatron's lines (the directory and
iteration loaded, or the warning that there is none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mm_train.checkpoint import messages
from mm_train.checkpoint.atomic import (
    all_ranks_ok,
    iteration_dir,
    latest_iteration,
    rank,
    save_atomically,
    verify_files,
    world_size,
)
from mm_train.checkpoint.state import read_file, rng_state, set_rng_state
from mm_train.errors import CheckpointError, first_line

COMMON_FILENAME = "common.pt"
DCP_METADATA = ".metadata"
FORMAT = "torch_dcp"


@dataclass
class LoadedCheckpoint:
    """What :func:`load_dcp_checkpoint` restored besides model and optimizer."""

    iteration: int
    consumed_samples: int
    extra: dict[str, Any] = field(default_factory=dict)


def save_dcp_checkpoint(checkpoint_dir: str | Path, iteration: int, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None, *, scheduler: Any = None,
                        consumed_samples: int = 0, save_optim: bool = True, save_rng: bool = True,
                        rng_tracker: Any = None, extra: dict[str, Any] | None = None,
                        metadata: dict[str, Any] | None = None,
                        write_also: Callable[[Path], None] | None = None) -> Path:
    """Writes iteration ``iteration`` under ``checkpoint_dir`` atomically; collective over all ranks.

    ``model`` is the module whose ``named_parameters`` are the global names (FSDP2-sharded or
    plain); ``optimizer`` is saved unless ``save_optim`` is False (``--no-save-optim``);
    ``scheduler`` is anything with ``state_dict()``; RNG states unless ``save_rng`` is False;
    ``extra`` is a small dict of tensors/numbers/strings returned as ``LoadedCheckpoint.extra``;
    ``metadata`` (plain JSON values, e.g. the run's configuration) goes into the manifest;
    ``write_also(staging)`` runs on every rank after the rest is written, to add files (e.g. a
    Hugging Face copy of the model) that become part of the checkpoint atomically (and of its manifest).
    Returns the final iteration directory.
    """

    def write(staging: Path) -> None:
        if save_optim and optimizer is not None:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
        else:
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=staging)
        if save_rng:
            torch.save(rng_state(rng_tracker), staging / f"rng_rank_{rank()}.pt")
        if rank() == 0:
            torch.save({
                "format": FORMAT,
                "iteration": iteration,
                "consumed_samples": consumed_samples,
                "world_size": world_size(),
                "has_optimizer": save_optim and optimizer is not None,
                "has_rng": save_rng,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "extra": extra or {},
            }, staging / COMMON_FILENAME)
        if write_also is not None:
            write_also(staging)

    return save_atomically(checkpoint_dir, iteration, write,
                           {"format": FORMAT, "iteration": iteration, **(metadata or {})})


def _read_common(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    missing = [name for name in (DCP_METADATA, COMMON_FILENAME) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    common = read_file(path / COMMON_FILENAME)
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    return common


def load_dcp_checkpoint(checkpoint_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        *, scheduler: Any = None, iteration: int | None = None, load_optim: bool = True,
                        load_rng: bool = True, rng_tracker: Any = None) -> LoadedCheckpoint | None:
    """Loads a checkpoint written by :func:`save_dcp_checkpoint` in place; collective over all ranks.

    ``iteration`` None means the one the marker names; with no marker nothing is loaded and None is
    returned after Megatron's warning (a fresh start, as Megatron does). ``model`` and
    ``optimizer`` must be built (for FSDP2: sharded and materialised) already, at any world
    size DCP can reshard to. ``load_optim``/``load_rng`` False skip those parts
    (``--no-load-optim``/``--no-load-rng``); the scheduler is restored when given and
    ``load_optim`` is on. Raises CheckpointError on every rank for a missing, partial or
    corrupt checkpoint, or for optimizer/RNG state that was not saved (or, for RNG, was saved
    at another world size).
    """
    if iteration is None:
        iteration = latest_iteration(checkpoint_dir)
        if iteration is None:
            messages.no_checkpoint(checkpoint_dir)
            return None
    messages.loading(checkpoint_dir, iteration)
    path = iteration_dir(checkpoint_dir, iteration)
    common = _read_common(path)
    verify_files(path, required=False)  # checkpoints written before manifests existed have none
    this_rank, size = rank(), world_size()
    load_optim = load_optim and optimizer is not None
    if load_optim and not common["has_optimizer"]:
        raise CheckpointError(f"{path}: saved without optimizer state; load it with --no-load-optim")
    if load_rng and not common["has_rng"]:
        raise CheckpointError(f"{path}: saved without RNG state; load it with --no-load-rng")
    if load_rng and common["world_size"] != size:
        raise CheckpointError(f"{path}: RNG states were saved at world size {common['world_size']}, "
                              f"loading at {size}; load it with --no-load-rng")
    rng, error = None, None
    try:
        if load_rng:
            rng = read_file(path / f"rng_rank_{this_rank}.pt")
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    try:
        if load_optim:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
    except (dcp.CheckpointException, OSError, RuntimeError, ValueError, KeyError) as failure:
        raise CheckpointError(f"{path}: corrupt or incompatible checkpoint: {first_line(failure)}") from failure
    if rng is not None:
        set_rng_state(rng, rng_tracker)
    if scheduler is not None and load_optim and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    messages.loaded(checkpoint_dir, common["iteration"], 1, 1)
    return LoadedCheckpoint(common["iteration"], common["consumed_samples"], common["extra"])
