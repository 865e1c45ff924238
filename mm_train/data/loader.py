"""Train/valid iterators over micro-batches for one data-parallel rank.

After ``consumed`` samples, global batch i is samples [consumed + i * global_batch_size, consumed +
(i + 1) * global_batch_size) of the stream (so a run resumed with another global batch size goes on
with the next sample). Rank r of dp_size takes the r-th contiguous slice of it and cuts that into
micro-batches, so concatenating the ranks' micro-batches in rank order gives the single-rank global
batch, for any dp_size.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch

from mm_train.data.documents import (
    ConcatenatedDocuments,
    IndexedDocuments,
    default_corpus_path,
    split_ranges,
    text_file_documents,
)
from mm_train.data.samples import BlendedStream, DocumentStream, MockStream, PackedStream
from mm_train.errors import DataError
from mm_train.features.data import DataConfig

TRAIN, VALID = 0, 1


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches as lists of (sample number, padded length), forever.

    Starts at sample ``consumed_samples``. The padded length is
    ``seq_length`` or, with ``variable_lengths``, the longest sample of the global batch minus one,
    rounded up to ``pad_multiple``.
    """

    def __init__(self, stream, consumed_samples: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int, variable_lengths: bool,
                 pad_multiple: int = 1) -> None:
        if consumed_samples < 0:
            raise ValueError(f"consumed_train_samples must be non-negative, got {consumed_samples}")
        self._stream = stream
        self._first = consumed_samples
        self._seq_length = seq_length
        self._micro_batch_size = micro_batch_size
        self._global_batch_size = global_batch_size
        self._per_rank = global_batch_size // dp_size
        self._dp_rank = dp_rank
        self._variable_lengths = variable_lengths
        self._pad_multiple = pad_multiple

    def _padded_length(self, first: int) -> int:
        longest = self._seq_length
        if self._variable_lengths:
            longest = max(self._stream.length(first + i) for i in range(self._global_batch_size)) - 1
        return -(-longest // self._pad_multiple) * self._pad_multiple

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first = self._first
        while True:
            length = self._padded_length(first)
            rank_first = first + self._dp_rank * self._per_rank
            for start in range(rank_first, rank_first + self._per_rank, self._micro_batch_size):
                yield [(k, length) for k in range(start, start + self._micro_batch_size)]
            first += self._global_batch_size


class SampleDataset(torch.utils.data.Dataset):
    """Turns (sample number, padded length) into the tensors of one sample.

    ``tokens`` ids[:-1] and ``labels`` ids[1:], padded with ``pad_id`` to the length; ``loss_mask``
    1.0 on real positions and 0.0 on padding; ``position_ids`` 0..length-1.
    """

    def __init__(self, stream, pad_id: int) -> None:
        self._stream = stream
        self._pad_id = pad_id

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        k, length = item
        ids = self._stream.sample(k)
        real = len(ids) - 1
        tokens = np.full(length, self._pad_id, dtype=np.int64)
        labels = np.full(length, self._pad_id, dtype=np.int64)
        tokens[:real] = ids[:-1]
        labels[:real] = ids[1:]
        loss_mask = np.zeros(length, dtype=np.float32)
        loss_mask[:real] = 1.0
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.arange(length, dtype=torch.int64),
        }


def _split_streams(documents, config: DataConfig, dataset_id: int) -> list:
    """Train and valid streams of one document collection; None where the split has nothing to sample."""
    ranges = split_ranges(len(documents.lengths), config.split)
    kind = DocumentStream if config.variable_seq_lengths else PackedStream
    shortest = 2 if config.variable_seq_lengths else 1
    streams = []
    for split in (TRAIN, VALID):
        document_ids = np.arange(*ranges[split])
        usable = bool(np.any(documents.lengths[document_ids] >= shortest))
        streams.append(kind(documents, document_ids, config.seq_length, config.seed, (dataset_id, split))
                       if usable else None)
    return streams


def _collections(config: DataConfig, tokenizer) -> tuple[list, tuple[float, ...] | None, str]:
    """Document collections to blend, their weights (None: one collection), and a name for messages."""
    if not config.data_paths:
        return [text_file_documents(default_corpus_path(), tokenizer)], None, "the default corpus"
    parts = [IndexedDocuments(prefix) for prefix in config.data_paths]
    if config.data_weights is None:
        return [ConcatenatedDocuments(parts) if len(parts) > 1 else parts[0]], None, "--data-path"
    return parts, config.data_weights, "--data-path"


def build_sample_streams(config: DataConfig, tokenizer) -> tuple[object, object | None, str]:
    """Train stream, valid stream (None when the valid split is empty) and a name of the data source."""
    if config.mock_data:
        train, valid = (MockStream(tokenizer.vocab_size, config.seq_length, config.variable_seq_lengths, config.seed,
                                   (0, split)) for split in (TRAIN, VALID))
        return train, valid, "--mock-data"
    collections, weights, source = _collections(config, tokenizer)
    per_collection = [_split_streams(documents, config, dataset_id)
                      for dataset_id, documents in enumerate(collections)]
    if weights is None:
        train, valid = per_collection[0]
    else:
        train, valid = (_blend([streams[split] for streams in per_collection], weights) for split in (TRAIN, VALID))
    if train is None:
        unit = "document of at least 2 tokens" if config.variable_seq_lengths else "token"
        split = ",".join(f"{fraction:g}" for fraction in config.split)
        raise ValueError(f"the train split of {source} (--split fractions {split}) holds no {unit}")
    return train, valid, source


def _blend(streams: list, weights: tuple[float, ...]):
    """Blend of the streams that exist, with their weights; None when none has data."""
    kept = [(stream, weight) for stream, weight in zip(streams, weights, strict=True) if stream is not None and weight > 0]
    if not kept:
        return None
    return BlendedStream([stream for stream, _ in kept], [weight for _, weight in kept])


def _check_config(config: DataConfig, dp_rank: int, dp_size: int) -> None:
    if config.seq_length < 1:
        raise ValueError(f"--seq-length must be positive, got {config.seq_length}")
    if config.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {config.seed}")
    if config.num_workers < 0:
        raise ValueError(f"--num-workers must be non-negative, got {config.num_workers}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if config.micro_batch_size < 1 or config.global_batch_size % (config.micro_batch_size * dp_size):
        raise ValueError(f"--global-batch-size {config.global_batch_size} must be a multiple of "
                         f"--micro-batch-size {config.micro_batch_size} x data-parallel size {dp_size}")


def _ignore_stop_signals(worker_id: int) -> None:
    """Worker processes ignore SIGINT and SIGTERM: the main process decides when to stop (with
    --exit-signal-handler it finishes the iteration first) and shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, sampler: GlobalBatchSampler, config: DataConfig,
                collate_fn=None) -> torch.utils.data.DataLoader:
    """The DataLoader of the trainer's batches: ``config.num_workers`` persistent workers that leave stop
    signals to the main process, and its own generator: creating the iterator must not draw from the
    global RNG, whose state a checkpoint restores (dropout after a resume would differ from the
    uninterrupted run)."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       collate_fn=collate_fn, persistent_workers=config.num_workers > 0,
                                       generator=torch.Generator().manual_seed(config.seed),
                                       worker_init_fn=_ignore_stop_signals)


def _iterate(stream, source: str, tokenizer, config: DataConfig, consumed: int, dp_rank: int,
             dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    sampler = GlobalBatchSampler(stream, consumed, config.seq_length, config.micro_batch_size,
                                 config.global_batch_size, dp_rank, dp_size, config.variable_seq_lengths,
                                 config.pad_multiple)
    loader = make_loader(SampleDataset(stream, tokenizer.pad), sampler, config)
    return _within_vocabulary(loader, tokenizer.vocab_size, source)


def _within_vocabulary(batches, vocab_size: int, source: str) -> Iterator[dict[str, torch.Tensor]]:
    """The batches, each checked in this process (a worker's exception would arrive as its traceback):
    a token id the model has no embedding for is a DataError naming the data."""
    for batch in batches:
        top = max((int(batch[key].max()) for key in ("tokens", "labels") if batch[key].numel()), default=-1)
        if top >= vocab_size:
            raise DataError(f"token id {top} of {source} is outside the vocabulary of {vocab_size}: was the "
                            "data built with another tokenizer?")
        yield batch


def consumed_valid_samples(config: DataConfig, consumed_train_samples: int) -> int:
    """Valid samples an uninterrupted run has evaluated after ``consumed_train_samples`` train samples."""
    iteration = consumed_train_samples // config.global_batch_size
    return (iteration // config.eval_interval) * config.eval_iters * config.global_batch_size


def build_data_iterators(config: DataConfig, tokenizer, consumed_train_samples: int, dp_rank: int,
                         dp_size: int) -> tuple[Iterator[dict[str, torch.Tensor]], Iterator[dict[str, torch.Tensor]] | None]:
    """Train and valid iterators over micro-batches of data-parallel rank ``dp_rank`` of ``dp_size``.

    Each item: ``tokens`` int64 [mbs, s], ``labels`` int64 [mbs, s] (tokens shifted by one),
    ``loss_mask`` float32 [mbs, s] (0 on padding), ``position_ids`` int64 [mbs, s]; s is
    ``config.seq_length`` or, with --variable-seq-lengths, the longest sample of the global batch,
    rounded up to ``config.pad_multiple``. The valid iterator is None when the valid split is empty or
    ``config.eval_iters`` is 0; it resumes where an uninterrupted run's evaluations (every
    ``config.eval_interval`` iterations) would be.
    """
    _check_config(config, dp_rank, dp_size)
    train, valid, source = build_sample_streams(config, tokenizer)
    train_iterator = _iterate(train, source, tokenizer, config, consumed_train_samples, dp_rank, dp_size)
    if valid is None or config.eval_iters == 0:
        return train_iterator, None
    valid_start = consumed_valid_samples(config, consumed_train_samples)
    return train_iterator, _iterate(valid, source, tokenizer, config, valid_start, dp_rank, dp_size)
