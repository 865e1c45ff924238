"""The manifest of a checkpoint directory: ``manifest.json`` lists every file with its size and SHA-256
(``sha256sum`` checks them by hand too) beside what the format records (iteration, layout, the run's
configuration). :func:`mm_train.checkpoint.atomic.save_atomically` writes it for every format and
:func:`mm_train.checkpoint.atomic.verify_files` checks the files against it before a load.

This module holds the single-process parts: hashing, the file entries, reading and writing the JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mm_train.errors import CheckpointError

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """The manifest entry of one file: ``{"bytes": size, "sha256": hex digest}``."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def listed_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (the manifest aside), as sorted paths relative to it."""
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*")
                  if path.is_file() and path.name != MANIFEST)


def entry_problem(directory: Path, name: str, entry: dict | int) -> str | None:
    """What is wrong with file ``name`` under ``directory`` against its manifest ``entry`` (None: nothing).
    An int entry is a size alone (manifests written before checksums)."""
    path = directory / name
    if not path.is_file():
        return f"{directory} is partial: {name} is missing"
    expected = entry if isinstance(entry, dict) else {"bytes": entry}
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path} is truncated or changed: {size} bytes, manifest says {expected['bytes']}"
    if "sha256" in expected and sha256(path) != expected["sha256"]:
        return f"{path} is corrupt: its SHA-256 differs from the one in {MANIFEST}"
    return None


def write_manifest(directory: Path, metadata: dict, files: dict[str, dict]) -> None:
    """Writes ``manifest.json``: ``metadata`` (plain JSON values) and ``"files": files`` (the atomic save
    fsyncs it with the rest of the staging directory)."""
    with open(directory / MANIFEST, "w") as handle:
        json.dump({**metadata, "files": files}, handle, indent=1)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` (None when it has none); CheckpointError when it is unreadable or
    has no file list."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except ValueError as error:
        raise CheckpointError(f"{path} is corrupt: {error}") from None
    return manifest
