"""Collections of tokenized documents: the shipped corpus (in memory) and Megatron indexed datasets.

A collection has ``lengths`` (int64 [num_documents]) and ``read(index, offset, count)`` returning the
int64 ids ``[offset, offset + count)`` of one document.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

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


class IndexedDocuments:
    """The sequences of a Megatron indexed dataset (``prefix.bin`` / ``prefix.idx``), one per document."""

    def __init__(self, prefix: str) -> None:
        module = indexed_dataset_module()
        if not module.IndexedDataset.exists(prefix):
            raise ValueError(f"--data-path {prefix}: {prefix}.bin and {prefix}.idx not found "
                             "(build them with mm-preprocess)")
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
