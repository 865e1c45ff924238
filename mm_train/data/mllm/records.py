"""Records of MindSpeed-MM's "mllm format" (sharegpt-style) JSON, read and checked.

A data file holds a JSON list of records (or one record per line). With the ``attr`` mapping of
the data configuration, a record is::

    {"messages": [{"role": "user", "content": "<image>What is shown?"},
                  {"role": "assistant", "content": "A red circle."}],
     "images": ["shapes/0001.png"]}

An optional first message with the system role (``attr.system_tag``), or the column
``attr.system``, gives the system prompt. The other messages alternate: user or observation turns,
then assistant or function turns, ending on an answer. Images are looked up under ``dataset_dir``
(then as written); each ``<image>`` placeholder takes the next image.

A record whose roles do not alternate is skipped, as MindSpeed-MM does (the trainer reports how
many once). A file that is not JSON, a record that is not a conversation, an image that is missing
or cannot be read, and a record whose ``<image>`` count differs from its images are
:class:`mm_train.errors.DataError` (one line naming the record and the file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mm_train.data.mllm.spec import AttrSpec
from mm_train.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
PROMPT_ROLES = ("user", "observation")
ANSWER_ROLES = ("assistant", "function")


@dataclass(frozen=True)
class Record:
    """One conversation. ``turns``: (role, content) with role in user / observation / assistant /
    function, prompts and answers alternating; ``images``: resolved paths with their (width, height)."""

    where: str
    system: str | None
    turns: tuple[tuple[str, str], ...]
    images: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]


@dataclass
class RecordSet:
    """The usable records of some files, and the ones skipped for their role order (count, first one)."""

    records: list[Record]
    skipped: int = 0
    first_skipped: str | None = None


def _read_json(path: str) -> list:
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"{path}: not JSON (line {whole.lineno} column {whole.colno}: {whole.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got a JSON {type(data).__name__}")
    return data


def _role(tag: object, attr: AttrSpec) -> str | None:
    names = {attr.user_tag: "user", attr.assistant_tag: "assistant", attr.observation_tag: "observation",
             attr.function_tag: "function"}
    names.pop(None, None)
    return names.get(tag)


def _messages(raw: dict, where: str, attr: AttrSpec) -> tuple[str | None, list[tuple[object, str]]]:
    messages = raw.get(attr.messages)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: '{attr.messages}' must be a list of messages")
    pairs = []
    for message in messages:
        content = message.get(attr.content_tag)
        if attr.role_tag not in message or not isinstance(content, str):
            raise DataError(f"{where}: every message needs '{attr.role_tag}' and a text '{attr.content_tag}'")
        pairs.append((message[attr.role_tag], content))
    system = raw.get(attr.system) if attr.system else None
    if pairs and attr.system_tag is not None and pairs[0][0] == attr.system_tag:
        system = pairs[0][1]
        pairs = pairs[1:]
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: the system prompt must be text")
    return system, pairs


def _turns(pairs: list[tuple[object, str]], attr: AttrSpec) -> tuple[tuple[str, str], ...] | None:
    """The turns with our role names, or None when the roles do not alternate prompt / answer."""
    if not pairs or len(pairs) % 2:
        return None
    turns = tuple((_role(tag, attr), content) for tag, content in pairs)
    for index, (role, _) in enumerate(turns):
        if role not in (PROMPT_ROLES if index % 2 == 0 else ANSWER_ROLES):
            return None
    return turns


def resolve_image(path: str, dataset_dir: str) -> str | None:
    """``dataset_dir/path`` if that file exists, else ``path`` if it exists, else None."""
    for candidate in (os.path.join(dataset_dir, path), path):
        if os.path.isfile(candidate):
            return candidate
    return None


def _image_size(path: str, where: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{where}: image {path} cannot be read ({type(error).__name__})") from None


def _images(raw: dict, where: str, attr: AttrSpec, dataset_dir: str) -> list[str]:
    images = raw.get(attr.images) if attr.images else None
    images = [] if images is None else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: '{attr.images}' must be a list of image paths")
    resolved = []
    for path in images:
        found = resolve_image(path, dataset_dir)
        if found is None:
            raise DataError(f"{where}: image {os.path.join(dataset_dir, path)} does not exist")
        resolved.append(found)
    return resolved


def read_record(raw: object, where: str, attr: AttrSpec, dataset_dir: str) -> Record | None:
    """The checked :class:`Record` of one parsed record; None when its roles do not alternate."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: not a JSON object")
    system, pairs = _messages(raw, where, attr)
    images = _images(raw, where, attr, dataset_dir)
    placeholders = sum(content.count(IMAGE_PLACEHOLDER) for _, content in pairs)
    if placeholders != len(images):
        listed = ", ".join(images) if images else "none"
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) "
                        f"({listed})")
    turns = _turns(pairs, attr)
    if turns is None:
        return None
    sizes = tuple(_image_size(path, where) for path in images)
    return Record(where, system, turns, tuple(images), sizes)


def read_records(paths: tuple[str, ...], attr: AttrSpec, dataset_dir: str, max_samples: int | None) -> RecordSet:
    """The records of ``paths`` in order (the first ``max_samples`` of them when set), checked."""
    result = RecordSet([])
    for path in paths:
        for index, raw in enumerate(_read_json(path)):
            if max_samples is not None and len(result.records) + result.skipped >= max_samples:
                return result
            where = f"record {index} of {path}"
            record = read_record(raw, where, attr, dataset_dir)
            if record is None:
                result.skipped += 1
                result.first_skipped = result.first_skipped or where
            else:
                result.records.append(record)
    return result
