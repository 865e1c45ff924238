"""Infinite, deterministic streams of training samples.

A stream maps a sample number k = 0, 1, 2, ... to an int64 array of 2 to seq_length + 1 ids
(``sample(k)``; ``length(k)`` is its length without reading it). Inputs are ids [:-1], labels [1:].
Every order is drawn from a generator keyed by (seed, stream key, epoch), so sample k is the
same in every process and after a restart; nothing depends on how many processes read the stream.
"""

from __future__ import annotations

import numpy as np


def _generator(seed: int, key: tuple[int, ...], *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key, *extra])


def _recent(cache: dict, key: int, build):
    """``build(key)``, remembered in ``cache``, which keeps the two most recent keys."""
    if key not in cache:
        if len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = build(key)
    return cache[key]


class PackedStream:
    """Documents concatenated in a shuffled order, cut into windows of seq_length + 1 ids.

    Window j of a cycle covers ids [j * seq_length, j * seq_length + seq_length + 1) of the concatenation
    (consecutive windows share one id, so every id is a label once). A cycle is one epoch over the
    documents, or several epochs when the documents hold fewer than seq_length + 1 ids. The windows
    of a cycle are visited in a shuffled order; each cycle reshuffles documents and windows.
    """

    def __init__(self, documents, document_ids: np.ndarray, seq_length: int, seed: int,
                 key: tuple[int, ...]) -> None:
        self._documents = documents
        self._document_ids = np.asarray(document_ids, dtype=np.int64)
        self._seq_length = seq_length
        self._seed = seed
        self._key = key
        tokens_per_epoch = int(documents.lengths[self._document_ids].sum())
        if tokens_per_epoch == 0:
            raise ValueError("no tokens to sample from")
        self._epochs_per_cycle = -(-(seq_length + 1) // tokens_per_epoch)
        self.samples_per_cycle = (self._epochs_per_cycle * tokens_per_epoch - 1) // seq_length
        self._cycles: dict = {}

    def _build_cycle(self, cycle: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order, their start offsets in the concatenation, and window order of ``cycle``."""
        orders = [_generator(self._seed, self._key, 0, cycle * self._epochs_per_cycle + e)
                  .permutation(self._document_ids) for e in range(self._epochs_per_cycle)]
        order = np.concatenate(orders)
        starts = np.concatenate([[0], np.cumsum(self._documents.lengths[order])])
        windows = _generator(self._seed, self._key, 1, cycle).permutation(self.samples_per_cycle)
        return order, starts, windows

    def length(self, k: int) -> int:
        """Ids in sample ``k``: always seq_length + 1."""
        return self._seq_length + 1

    def sample(self, k: int) -> np.ndarray:
        """int64 [seq_length + 1] ids of sample ``k``."""
        cycle, position = divmod(int(k), self.samples_per_cycle)
        order, starts, windows = _recent(self._cycles, cycle, self._build_cycle)
        begin = int(windows[position]) * self._seq_length
        end = begin + self._seq_length + 1
        slot = int(np.searchsorted(starts, begin, side="right")) - 1
        pieces = []
        while begin < end:
            offset = begin - int(starts[slot])
            count = min(end, int(starts[slot + 1])) - begin
            if count > 0:
                pieces.append(self._documents.read(int(order[slot]), offset, count))
            begin += max(count, 0)
            slot += 1
        return np.concatenate(pieces)


class DocumentStream:
    """One document per sample, truncated to seq_length + 1 ids, documents shuffled anew each epoch.

    Documents shorter than 2 ids cannot give an input and a label and are left out.
    """

    def __init__(self, documents, document_ids: np.ndarray, seq_length: int, seed: int,
                 key: tuple[int, ...]) -> None:
        document_ids = np.asarray(document_ids, dtype=np.int64)
        self._documents = documents
        self._document_ids = document_ids[documents.lengths[document_ids] >= 2]
        if len(self._document_ids) == 0:
            raise ValueError("no document of at least 2 tokens to sample from")
        self._seq_length = seq_length
        self._seed = seed
        self._key = key
        self.samples_per_cycle = len(self._document_ids)
        self._orders: dict = {}

    def _build_order(self, epoch: int) -> np.ndarray:
        return _generator(self._seed, self._key, 2, epoch).permutation(self._document_ids)

    def _document(self, k: int) -> int:
        epoch, position = divmod(int(k), self.samples_per_cycle)
        return int(_recent(self._orders, epoch, self._build_order)[position])

    def length(self, k: int) -> int:
        """Ids in sample ``k``: its document's length, at most seq_length + 1."""
        return min(int(self._documents.lengths[self._document(k)]), self._seq_length + 1)

    def sample(self, k: int) -> np.ndarray:
        """int64 ids of sample ``k``: the first ``length(k)`` ids of its document."""
        return self._documents.read(self._document(k), 0, self.length(k))


class MockStream:
    """Random ids in [0, vocab_size): seq_length + 1 of them, or a random length in [2, seq_length + 1]."""

    def __init__(self, vocab_size: int, seq_length: int, variable_lengths: bool, seed: int,
                 key: tuple[int, ...]) -> None:
        self._vocab_size = vocab_size
        self._seq_length = seq_length
        self._variable_lengths = variable_lengths
        self._seed = seed
        self._key = key

    def _draw_length(self, generator: np.random.Generator) -> int:
        if not self._variable_lengths:
            return self._seq_length + 1
        return int(generator.integers(2, self._seq_length + 2))

    def length(self, k: int) -> int:
        """Ids in sample ``k``."""
        return self._draw_length(_generator(self._seed, self._key, 3, int(k)))

    def sample(self, k: int) -> np.ndarray:
        """int64 random ids of sample ``k``."""
        generator = _generator(self._seed, self._key, 3, int(k))
        return generator.integers(0, self._vocab_size, size=self._draw_length(generator), dtype=np.int64)


class BlendedStream:
    """Samples drawn from several streams in the proportions of ``weights``.

    A fixed pattern of ``period`` slots assigns each slot to the stream whose share is furthest behind
    its weight; the pattern repeats, so sample k's stream and its position there are computed directly.
    """

    def __init__(self, streams: list, weights: list[float], period: int = 4096) -> None:
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        counts = np.zeros(len(streams), dtype=np.int64)
        pattern = np.zeros(period, dtype=np.int64)
        positions = np.zeros(period, dtype=np.int64)
        for slot in range(period):
            chosen = int(np.argmax(shares * (slot + 1) - counts))
            pattern[slot] = chosen
            positions[slot] = counts[chosen]
            counts[chosen] += 1
        self._streams = streams
        self._pattern = pattern
        self._positions = positions
        self._per_period = counts
        self._period = period

    def _locate(self, k: int) -> tuple[object, int]:
        repeat, slot = divmod(int(k), self._period)
        stream = int(self._pattern[slot])
        return self._streams[stream], int(repeat * self._per_period[stream] + self._positions[slot])

    def length(self, k: int) -> int:
        """Ids in sample ``k``."""
        stream, position = self._locate(k)
        return stream.length(position)

    def sample(self, k: int) -> np.ndarray:
        """int64 ids of sample ``k``."""
        stream, position = self._locate(k)
        return stream.sample(position)
