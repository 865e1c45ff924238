"""Data and tokenizer: the flags, their parsing and checks, and :class:`DataConfig`, everything the data
pipeline (:mod:`mm_train.data`) reads."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import non_negative_int, positive_int

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer")


@dataclass(frozen=True)
class DataConfig:
    """What the data pipeline reads: the data flags (parsed), and the model/training values it needs.

    data_paths: indexed-dataset prefixes (empty: the corpus that ships with the package);
    data_weights: their blend weights, or None to concatenate them; split: normalised
    (train, valid, test) fractions of every dataset's documents; pad_multiple: what padded lengths
    keep (:func:`mm_train.features.context_parallel.sequence_multiple`).
    """

    data_paths: tuple[str, ...]
    data_weights: tuple[float, ...] | None
    split: tuple[float, float, float]
    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None
    num_workers: int
    variable_seq_lengths: bool
    mock_data: bool
    seq_length: int
    seed: int
    micro_batch_size: int
    global_batch_size: int
    eval_interval: int
    eval_iters: int
    pad_multiple: int = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --data-path, --split, --tokenizer-type, --tokenizer-model, --vocab-size, --num-workers,
    --variable-seq-lengths and --mock-data to ``parser``."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="Prefixes of Megatron indexed datasets (.bin/.idx), optionally weighted: "
                            "'P1 P2' or 'W1 P1 W2 P2'. Default: the corpus that ships with mm_train.")
    group.add_argument("--split", default="969,30,1",
                       help="Train,valid,test weights splitting the documents of each dataset.")
    group.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="Local directory of a Hugging Face tokenizer (with HuggingFaceTokenizer).")
    group.add_argument("--vocab-size", type=positive_int, default=None,
                       help="Vocabulary size; at least the tokenizer's (default: the tokenizer's).")
    group.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader worker processes (0: none).")
    group.add_argument("--variable-seq-lengths", action="store_true",
                       help="One document per sample, batches padded to their longest sample.")
    group.add_argument("--mock-data", action="store_true", help="Random tokens instead of a dataset.")


def _parse_split(split: str) -> tuple[float, float, float]:
    """Normalised (train, valid, test) fractions of ``split`` ("969,30,1", "98,2" or "1")."""
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split must be comma-separated numbers like '969,30,1', got {split!r}") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split must be 1 to 3 non-negative weights with a positive sum, got {split!r}")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return weights[0] / total, weights[1] / total, weights[2] / total


def _parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Prefixes and weights of --data-path: 'P1 P2' gives weights None, 'W1 P1 W2 P2' gives [W1, W2]."""
    if not data_path:
        raise ValueError("--data-path needs at least one prefix")

    def as_weight(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    if as_weight(data_path[0]) is None:
        if any(as_weight(item) is not None for item in data_path):
            raise ValueError(f"--data-path mixes weights and prefixes: {' '.join(data_path)}")
        return list(data_path), None
    if len(data_path) % 2:
        raise ValueError(f"--data-path with weights needs 'W1 P1 W2 P2 ...' pairs, got {' '.join(data_path)}")
    weights = [as_weight(item) for item in data_path[0::2]]
    prefixes = data_path[1::2]
    if any(w is None or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--data-path weights must be non-negative numbers with a positive sum: {' '.join(data_path)}")
    return prefixes, weights


def check(args: argparse.Namespace) -> None:
    """--split and --data-path that do not parse, and --mock-data with --data-path (ConfigError, one line)."""
    try:
        _parse_split(args.split)
        if args.data_path:
            _parse_data_path(args.data_path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if args.mock_data and args.data_path:
        raise ConfigError("--mock-data and --data-path exclude each other")


def to_config(args: argparse.Namespace, pad_multiple: int) -> DataConfig:
    """The :class:`DataConfig` of the (checked) data flags and the sequence, batch, seed and evaluation
    flags; ``pad_multiple`` from the sequence padding rule."""
    prefixes, weights = _parse_data_path(args.data_path) if args.data_path else ([], None)
    return DataConfig(
        data_paths=tuple(prefixes), data_weights=None if weights is None else tuple(weights),
        split=_parse_split(args.split), tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size, num_workers=args.num_workers, variable_seq_lengths=args.variable_seq_lengths,
        mock_data=args.mock_data, seq_length=args.seq_length, seed=args.seed,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, pad_multiple=pad_multiple)
