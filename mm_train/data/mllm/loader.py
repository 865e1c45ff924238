"""Multimodal batches for one data-parallel rank: deterministic, resumable, padded per global batch.

The records are read and checked once at start-up (:mod:`mm_train.data.mllm.records`) and encoded to
learn their lengths; a DataLoader then encodes each sample again and loads its images. Sample k of a
stream is a record: the order is reshuffled every epoch from (--seed, epoch) unless the data
configuration says ``shuffle: false``, so it is the same in every process and after a restart.
Global batches are cut over data-parallel ranks by :class:`mm_train.data.loader.GlobalBatchSampler`
and padded to the longest sample of the global batch, so every layout sees the same micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mm_train.data.loader import GlobalBatchSampler, make_loader
from mm_train.data.mllm.images import ImagePreparer
from mm_train.data.mllm.records import Record
from mm_train.data.mllm.template import RecordEncoder
from mm_train.errors import DataError
from mm_train.features.data import DataConfig


class RecordStream:
    """Sample number k -> record index, epoch after epoch (shuffled per epoch unless ``shuffle`` is off);
    ``length(k)``: the encoded length of that record."""

    def __init__(self, lengths: np.ndarray, seed: int, key: int, shuffle: bool) -> None:
        if len(lengths) == 0:
            raise DataError("no usable record to sample from")
        self._lengths = lengths
        self._seed, self._key, self._shuffle = seed, key, shuffle
        self._order: tuple[int, np.ndarray] | None = None

    def record(self, k: int) -> int:
        """The record index of sample ``k``."""
        epoch, position = divmod(int(k), len(self._lengths))
        if not self._shuffle:
            return position
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self._seed, self._key, epoch]).permutation(len(self._lengths)))
        return int(self._order[1][position])

    def length(self, k: int) -> int:
        """Tokens of sample ``k`` (its input ids are all but the last, its labels all but the first)."""
        return int(self._lengths[self.record(k)])


@dataclass
class EncodedSet:
    """Records, their encoded lengths and their stream."""

    records: list[Record]
    stream: RecordStream


class SampleSet(torch.utils.data.Dataset):
    """(sample number, padded length) -> the tensors of one sample, or ``{"error": message}`` for data
    that turns out unusable when loaded (so the message reaches the trainer from any worker).

    ``input_ids`` ids[:-1] and ``labels`` labels[1:] padded to the length (ids with ``pad_id``, labels with
    -100, or with ``pad_id`` when padding counts in the loss), ``attention_mask`` 1 on real tokens;
    ``pixel_values`` [patches, dim] and ``image_grid_thw`` [images, 3] of its images (0 rows without).
    """

    def __init__(self, encoded: EncodedSet, encoder: RecordEncoder, images: ImagePreparer, pad_id: int,
                 label_pad_id: int) -> None:
        self.encoded = encoded
        self.encoder = encoder
        self.images = images
        self.pad_id = pad_id
        self.label_pad_id = label_pad_id

    def sample(self, record: Record, length: int) -> dict[str, torch.Tensor]:
        """The padded tensors of ``record`` (see the class doc)."""
        loaded = [self.images.load(path, record.where) for path in record.images]
        tokens = [int(grid.prod()) // self.images.merge ** 2 for _, grid in loaded]
        ids, labels = self.encoder.encode(record, tokens)
        real = len(ids) - 1
        input_ids = torch.full((length,), self.pad_id, dtype=torch.int64)
        targets = torch.full((length,), self.label_pad_id, dtype=torch.int64)
        input_ids[:real] = torch.tensor(ids[:-1], dtype=torch.int64)
        targets[:real] = torch.tensor(labels[1:], dtype=torch.int64)
        mask = torch.zeros(length, dtype=torch.int64)
        mask[:real] = 1
        dim = self.images.processor.patch_size ** 2 * self.images.processor.temporal_patch_size * 3
        return {
            "input_ids": input_ids, "labels": targets, "attention_mask": mask,
            "pixel_values": torch.cat([p for p, _ in loaded]) if loaded else torch.zeros(0, dim),
            "image_grid_thw": torch.cat([g for _, g in loaded]) if loaded else torch.zeros(0, 3, dtype=torch.int64),
        }

    def __getitem__(self, item: tuple[int, int]) -> dict:
        k, length = item
        try:
            return self.sample(self.encoded.records[self.encoded.stream.record(k)], length)
        except DataError as error:
            return {"error": str(error)}


def collate(samples: list[dict]) -> dict:
    """A micro-batch: [mbs, s] ids, labels and mask stacked, pixel values and grids of all its images
    concatenated in sample order; ``{"error": message}`` when a sample could not be loaded."""
    for sample in samples:
        if "error" in sample:
            return sample
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("input_ids", "labels", "attention_mask")}
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return batch


def _raising(batches: Iterator[dict]) -> Iterator[dict]:
    for batch in batches:
        if "error" in batch:
            raise DataError(batch["error"])
        yield batch


def batch_iterator(samples: SampleSet, consumed: int, config: DataConfig, dp_rank: int,
                   dp_size: int) -> Iterator[dict]:
    """Micro-batches of data-parallel rank ``dp_rank`` from sample ``consumed`` on (see the module doc);
    ``config.pad_multiple`` is what padded lengths keep."""
    sampler = GlobalBatchSampler(samples.encoded.stream, consumed, config.seq_length, config.micro_batch_size,
                                 config.global_batch_size, dp_rank, dp_size, variable_lengths=True,
                                 pad_multiple=config.pad_multiple)
    return _raising(iter(make_loader(samples, sampler, config, collate_fn=collate)))

