"""Collections of tokenized documents: the shipped corpus (in memory) and Megatron indexed datasets.

A collection has ``lengths`` (int64 [num_documents]) and ``read(index, offset, count)`` returning the
int64 ids ``[offset, offset + count)`` of one document.
"""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path

import numpy as np

from mm_train.errors import DataError

DEFAULT_CORPUS = "mm_corpus.txt"


def default_corpus_path() -> Path:
    """Path of the corpus that ships with the package (``mm_train/data/corpus/mm_corpus.txt``)."""
    path = Path(str(resources.files("mm_train.data") / "corpus" / DEFAULT_CORPUS))
    if not path.is_file():
        raise FileNotFoundError(f"the default corpus {path} is missing from the mm_train installation")
    return path


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset (imported on first use: megatron-core is slow to import)."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class InMemoryDocuments:
    """Documents held in one flat int64 array."""

    def __init__(self, documents: list[np.ndarray]) -> None:
        self.lengths = np.array([len(d) for d in documents], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self._tokens = np.concatenate(documents).astype(np.int64) if documents else np.zeros(0, np.int64)

    def read(self, index: int, offset: int, count: int) -> np.ndarray:
        """Ids ``[offset, offset + count)`` of document ``index``."""
        start = self._starts[index] + offset
        return self._tokens[start:start + count]


# Megatron's .idx: magic, version <Q (1), token dtype code <B, sequence count <Q, document count <Q,
# then int32 sequence lengths, int64 sequence byte offsets into the .bin, int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def check_indexed_files(prefix: str) -> None:
    """Checks the .idx/.bin pair of ``prefix`` before it is opened: both present, the index whole and
    of Megatron's format, the data file as long as the index says. DataError (one line naming the file
    and what is wrong) otherwise."""
    module = indexed_dataset_module()
    idx, bin_ = Path(module.get_idx_path(prefix)), Path(module.get_bin_path(prefix))
    missing = [str(path) for path in (idx, bin_) if not path.is_file()]
    if missing:
        raise DataError(f"--data-path {prefix}: {' and '.join(missing)} not found (build them with mm-preprocess)")
    size = idx.stat().st_size
    if size < _IDX_HEADER.size:
        raise DataError(f"{idx} is {'empty' if size == 0 else f'truncated ({size} bytes)'}: not even the "
                        f"{_IDX_HEADER.size}-byte header of an index")
    magic, version, code, sequences, documents = _IDX_HEADER.unpack(_read_at(idx, 0, _IDX_HEADER.size))
    if magic != _IDX_MAGIC or version != 1:
        raise DataError(f"{idx} is not a Megatron index file (version 1)")
    try:
        token_bytes = module.DType.size(module.DType.dtype_from_code(code))
    except ValueError:
        raise DataError(f"{idx}: unknown token type code {code}") from None
    expected = _IDX_HEADER.size + 12 * sequences + 8 * documents
    if size < expected:
        raise DataError(f"{idx} is truncated: {size} bytes, its header announces {expected}")
    if sequences == 0:
        raise DataError(f"{idx} holds no documents")
    length, = struct.unpack("<i", _read_at(idx, _IDX_HEADER.size + 4 * (sequences - 1), 4))
    pointer, = struct.unpack("<q", _read_at(idx, _IDX_HEADER.size + 4 * sequences + 8 * (sequences - 1), 8))
    needed = pointer + length * token_bytes
    if bin_.stat().st_size < needed:
        raise DataError(f"{bin_} is truncated: {bin_.stat().st_size} bytes, its index needs {needed}")


class IndexedDocuments:
    """The sequences of a Megatron indexed dataset (``prefix.bin`` / ``prefix.idx``), one per document;
    DataError for files that are missing or damaged (:func:`check_indexed_files`)."""

    def __init__(self, prefix: str) -> None:
        check_indexed_files(prefix)
        module = indexed_dataset_module()
        self.prefix = prefix
        self._dataset = module.IndexedDataset(prefix)
        self.lengths = self._dataset.sequence_lengths.astype(np.int64)

    def read(self, index: int, offset: int, count: int) -> np.ndarray:
        """Ids ``[offset, offset + count)`` of document ``index``."""
        return self._dataset.get(int(index), offset=int(offset), length=int(count)).astype(np.int64)


class ConcatenatedDocuments:
    """Several collections seen as one, documents in order."""

    def __init__(self, parts: list) -> None:
        self._parts = parts
        self.lengths = np.concatenate([part.lengths for part in parts])
        self._firsts = np.cumsum([0] + [len(part.lengths) for part in parts])

    def read(self, index: int, offset: int, count: int) -> np.ndarray:
        """Ids ``[offset, offset + count)`` of document ``index``."""
        part = int(np.searchsorted(self._firsts, index, side="right")) - 1
        return self._parts[part].read(index - self._firsts[part], offset, count)


def split_text_documents(text: str) -> list[str]:
    """Documents of a corpus text: blocks separated by blank lines, stripped, empty ones dropped."""
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def text_file_documents(path: Path, tokenizer) -> InMemoryDocuments:
    """The blank-line separated documents of a text file, tokenized, each ending with ``tokenizer.eod``."""
    text = Path(path).read_text(encoding="utf-8")
    return InMemoryDocuments([np.array(tokenizer.tokenize(block) + [tokenizer.eod], dtype=np.int64)
                              for block in split_text_documents(text)])


def split_ranges(num_documents: int, fractions: tuple[float, float, float]) -> list[tuple[int, int]]:
    """[start, end) document ranges of train, valid and test for the ``fractions`` of --split."""
    bounds = [0]
    for fraction in np.cumsum(fractions):
        bounds.append(min(num_documents, int(round(fraction * num_documents))))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]
