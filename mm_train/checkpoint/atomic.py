"""The atomic checkpoint write every format uses, and the marker that names the newest checkpoint.

Layout under the checkpoint root::

    latest_checkpointed_iteration.txt    the newest complete iteration, replaced last
    iter_0000020/                        one iteration, written by :func:`save_atomically`
    iter_0000020/manifest.json           layout, iteration and the size of every file (:func:`write_manifest`)

A save is collective: rank 0 creates an empty staging directory ``iter_0000020.tmp``, every rank
writes its files into it, and after a barrier rank 0 adds what needs every rank's files (a
manifest), fsyncs every file and directory in it, renames it to ``iter_0000020`` (an older copy is
moved aside first and removed after), fsyncs the root, and only then replaces the marker (written to
a temporary file, fsynced, renamed, root fsynced). A crash at any point leaves the marker naming a
complete checkpoint (the old one or the new one), never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from mm_train.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"


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


def save_atomically(root: str | Path, iteration: int, write: Callable[[Path], None],
                    seal: Callable[[Path], None] | None = None) -> Path:
    """Saves iteration ``iteration`` under ``root`` as described in the module doc (collective).

    ``write(staging)`` runs on every rank and writes that rank's files into the staging directory;
    ``seal(staging)`` runs on rank 0 once every rank has written (e.g. a manifest of all files).
    Returns the final iteration directory.
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
    if rank() == 0:
        if seal is not None:
            seal(staging)
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


def write_manifest(directory: Path, iteration: int, layout: dict[str, int], format_version: int) -> None:
    """Writes ``directory/manifest.json``: format version, iteration, ``layout`` and every file's size
    (call it from ``seal``, once every rank has written)."""
    files = {str(path.relative_to(directory)): path.stat().st_size
             for path in sorted(directory.rglob("*")) if path.is_file()}
    manifest = {"format_version": format_version, "iteration": iteration, "layout": layout, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def check_manifest(directory: Path) -> dict[str, int]:
    """Checks every file the manifest of ``directory`` lists (present, same size); returns the saved layout.
    CheckpointError when the manifest is missing or corrupt, or a file is missing or changed."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, layout = manifest["files"], manifest["layout"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt: {error}") from None
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is partial: {name} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} is truncated or changed: {path.stat().st_size} bytes, manifest says {size}")
    return layout
