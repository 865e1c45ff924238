"""The atomic checkpoint write every format uses, the manifest that lists and checksums its files,
and the marker that names the newest checkpoint.

Layout under the checkpoint root::

    latest_checkpointed_iteration.txt    the newest complete iteration, replaced last
    iter_0000020/                        one iteration, written by :func:`save_atomically`
    iter_0000020/manifest.json           every file's size and SHA-256, and the format's metadata

A save is collective: rank 0 creates an empty staging directory ``iter_0000020.tmp``, every rank
writes its files into it, and after a barrier the ranks hash the files (each a share of them) and
rank 0 writes the manifest (:mod:`mm_train.checkpoint.manifest`), fsyncs every file and directory in
the staging directory, renames it to ``iter_0000020`` (an older copy is moved aside first and removed
after), fsyncs the root, and only then replaces the marker (written to a temporary file, fsynced,
renamed, root fsynced). A crash at any point leaves the marker naming a complete checkpoint (the old
one or the new one), never a half-written one. Before a load, :func:`verify_files` checks every
file against the manifest (the ranks share the work), so a truncated or corrupted file is one error
naming it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mm_train.checkpoint.manifest import (
    MANIFEST,
    entry_problem,
    file_entry,
    listed_files,
    read_manifest,
    write_manifest,
)
from mm_train.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, iteration: int) -> Path:
    """``root/iter_0000020`` for iteration 20."""
    return Path(root) / f"iter_{iteration:07d}"


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    """torch.distributed.barrier() when a process group exists (single-process use needs none)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync(path: Path) -> None:
    """Flushes a file's or a directory's entries to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):  # files before the directories holding them
        _fsync(path)
    _fsync(directory)


def _write_synced(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` and flushes it to the disk."""
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(root: Path, staging: Path, final: Path, iteration: int) -> None:
    previous = final.with_name(final.name + ".old")
    _fsync_tree(staging)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync(root)
    shutil.rmtree(previous, ignore_errors=True)
    tracker = root / TRACKER
    temporary = tracker.with_name(TRACKER + ".tmp")
    _write_synced(temporary, str(iteration))
    os.replace(temporary, tracker)
    _fsync(root)


def _hash_files(staging: Path) -> dict[str, dict]:
    """Manifest entries of every file in ``staging`` (collective: rank 0 lists them, each rank hashes
    a share); complete on rank 0 only."""
    names = [listed_files(staging) if rank() == 0 else None]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(names, src=0)
    share = {name: file_entry(staging / name) for name in names[0][rank()::world_size()]}
    shares = [share]
    if torch.distributed.is_initialized():
        shares = [None] * world_size()
        torch.distributed.gather_object(share, shares if rank() == 0 else None, dst=0)
    return {name: entry for part in shares if part for name, entry in sorted(part.items())}


def save_atomically(root: str | Path, iteration: int, write: Callable[[Path], None], metadata: dict) -> Path:
    """Saves iteration ``iteration`` under ``root`` as described in the module doc (collective).

    ``write(staging)`` runs on every rank and writes that rank's files into the staging directory;
    ``metadata`` (plain JSON values, e.g. iteration and layout) goes into the manifest beside the
    files' sizes and checksums. Returns the final iteration directory.
    """
    root = Path(root)
    final = iteration_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    write(staging)
    barrier()
    files = _hash_files(staging)
    if rank() == 0:
        write_manifest(staging, metadata, files)
        _publish(root, staging, final, iteration)
    barrier()
    return final


def latest_iteration(root: str | Path) -> int | None:
    """The iteration named by the marker file under ``root``; None when there is no marker."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration number, found {text[:40]!r}")
    return int(text)


def verify_files(directory: Path, required: bool = True) -> dict | None:
    """Checks every file of checkpoint ``directory`` against its manifest: present, of the listed size
    and SHA-256 (collective: each rank checks a share). Returns the manifest; None when there is none
    and it is not ``required``. Raises CheckpointError on every rank, naming the first bad file."""
    error, manifest = None, None
    try:
        if not directory.is_dir():
            raise CheckpointError(f"{directory} does not exist")
        manifest = read_manifest(directory)
        if manifest is None and required:
            raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
        files = manifest["files"] if manifest is not None else {}
        for name in sorted(files)[rank()::world_size()]:
            problem = entry_problem(directory, name, files[name])
            if problem is not None:
                raise CheckpointError(problem)
    except CheckpointError as failure:
        error = str(failure)
    all_ranks_ok(error)
    return manifest


def all_ranks_ok(error: str | None) -> None:
    """Raises CheckpointError on every rank when any rank reports an ``error`` (so no rank is left
    waiting in a later collective); a rank's own error is raised as is, another's names that rank."""
    errors = [error]
    if torch.distributed.is_initialized():
        errors = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(errors, error)
    if error is not None:
        raise CheckpointError(error)
    failures = [(index, e) for index, e in enumerate(errors) if e is not None]
    if failures:
        index, message = failures[0]
        raise CheckpointError(f"rank {index}: {message}")
