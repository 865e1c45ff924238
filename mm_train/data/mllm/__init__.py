"""Multimodal (image + text) data in MindSpeed-MM's "mllm format", for the Hugging Face engine.

:func:`load_tokenizer` and :func:`load_image_processor` read the model directory named by
``preprocess_parameters.model_name_or_path``; :class:`MllmData` reads and checks the records at
start-up and gives each data-parallel rank its train and validation micro-batches
(:meth:`MllmData.iterators`). The data configuration is :class:`spec.MllmDataSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from mm_train.data.loader import TRAIN, VALID, consumed_valid_samples
from mm_train.data.mllm.images import ImagePreparer
from mm_train.data.mllm.loader import EncodedSet, RecordStream, SampleSet, batch_iterator
from mm_train.data.mllm.records import Record, read_records
from mm_train.data.mllm.spec import MllmDataSpec
from mm_train.data.mllm.template import (
    END_OF_TURN,
    IGNORE_INDEX,
    IMAGE_PAD,
    TEMPLATES,
    VISION_END,
    VISION_START,
    RecordEncoder,
)
from mm_train.errors import DataError, first_line
from mm_train.features.data import DataConfig

_REQUIRED_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, END_OF_TURN)


def load_tokenizer(spec: MllmDataSpec):
    """The tokenizer of ``model_name_or_path`` (right padding), with ``<|im_end|>`` as its end of sequence
    and a pad token (the end of sequence when it has none), as MindSpeed-MM sets them."""
    from transformers import AutoTokenizer

    path = spec.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=spec.use_fast_tokenizer,
                                                  split_special_tokens=spec.split_special_tokens,
                                                  padding_side="right", local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: no usable tokenizer ({first_line(error)})") from None
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in _REQUIRED_TOKENS if token not in vocabulary]
    if missing:
        raise DataError(f"{path}: the tokenizer lacks the special tokens {missing}")
    tokenizer.eos_token = END_OF_TURN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_image_processor(spec: MllmDataSpec):
    """The image processor of ``model_name_or_path`` (Qwen2-VL family: patches, merge size, grid)."""
    from transformers import AutoImageProcessor

    path = spec.model_name_or_path
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: no usable image processor ({first_line(error)})") from None
    if not all(hasattr(processor, name) for name in ("merge_size", "patch_size", "get_number_of_image_patches")):
        raise DataError(f"{path}: {type(processor).__name__} is not a Qwen-VL image processor")
    return processor


class MllmData:
    """The train and validation records of ``spec``, checked and encoded once.

    Validation records come from ``val_dataset``, else a ``val_rate`` share of the train records
    (drawn with ``seed``), else there are none. ``skipped`` / ``first_skipped``: records left out
    because their roles do not alternate.
    """

    def __init__(self, spec: MllmDataSpec, tokenizer, image_processor, seq_length: int, seed: int) -> None:
        self.spec = spec
        self.seed = seed
        self.images = ImagePreparer(image_processor, spec.image_min_pixels, spec.image_max_pixels)
        self.encoder = RecordEncoder(tokenizer, TEMPLATES[spec.template], seq_length, spec.train_on_prompt,
                                     spec.mask_history)
        self.pad_id = tokenizer.pad_token_id
        self.label_pad_id = IGNORE_INDEX if spec.ignore_pad_token_for_loss else self.pad_id
        train = read_records(spec.datasets, spec.attr, spec.dataset_dir, spec.max_samples)
        self.skipped, self.first_skipped = train.skipped, train.first_skipped
        records = train.records
        valid: list[Record] = []
        if spec.val_datasets:
            held_out = read_records(spec.val_datasets, spec.attr, spec.dataset_dir, spec.val_max_samples)
            valid = held_out.records
            self.skipped += held_out.skipped
            self.first_skipped = self.first_skipped or held_out.first_skipped
        elif spec.val_rate > 0 and len(records) > 1:
            order = np.random.default_rng(seed).permutation(len(records))
            count = min(len(records) - 1, max(1, round(spec.val_rate * len(records))))
            valid = [records[i] for i in sorted(order[:count])][:spec.val_max_samples]
            records = [records[i] for i in sorted(order[count:])]
        if not records:
            raise DataError(f"{', '.join(spec.datasets)}: no usable record")
        self.train = self._encoded(records, TRAIN)
        self.valid = self._encoded(valid, VALID) if valid else None

    def _encoded(self, records: list[Record], key: int) -> EncodedSet:
        lengths = np.array([len(self.encoder.encode(record, [self.images.tokens(*size) for size in record.image_sizes])[0])
                            for record in records], dtype=np.int64)
        short = [record.where for record, length in zip(records, lengths, strict=True) if length < 2]
        if short:
            raise DataError(f"{short[0]}: encodes to fewer than 2 tokens")
        return EncodedSet(records, RecordStream(lengths, self.seed, key, self.spec.shuffle))

    def _samples(self, encoded: EncodedSet) -> SampleSet:
        return SampleSet(encoded, self.encoder, self.images, self.pad_id, self.label_pad_id)

    def iterators(self, config: DataConfig, consumed_train_samples: int, dp_rank: int,
                  dp_size: int) -> tuple[Iterator[dict], Iterator[dict] | None]:
        """Train and validation micro-batches of data-parallel rank ``dp_rank`` (validation None without
        held-out records or with --eval-iters 0), resuming after ``consumed_train_samples``.

        A micro-batch: ``input_ids``, ``labels`` (already shifted: label t is the target of input t),
        ``attention_mask`` int64 [mbs, s]; ``pixel_values`` float32 [patches, dim] and ``image_grid_thw``
        int64 [images, 3] of all its images.
        """
        train = batch_iterator(self._samples(self.train), consumed_train_samples, config, dp_rank, dp_size)
        if self.valid is None or config.eval_iters == 0:
            return train, None
        start = consumed_valid_samples(config, consumed_train_samples)
        return train, batch_iterator(self._samples(self.valid), start, config, dp_rank, dp_size)


def processor_files_exist(path: str) -> bool:
    """True when ``path`` is a directory holding a tokenizer and an image processor configuration."""
    return os.path.isfile(os.path.join(path, "preprocessor_config.json")) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json"))


__all__ = ["MllmData", "MllmDataSpec", "load_image_processor", "load_tokenizer", "processor_files_exist"]
