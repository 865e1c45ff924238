"""Data and tokenizer: the flags, their parsing and checks, and :class:`DataConfig`, everything the data
pipeline (:mod:`mm_train.data`) reads."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mm_train.errors import ConfigError
from mm_train.features import non_negative_int, positive_int

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer", "PretrainedFromHF", "Llama2Tokenizer",
                   "GPTSentencePieceTokenizer", "NullTokenizer")
# Tokenizer types of Megatron / MindSpeed that are refused, with the reason.
REFUSED_TOKENIZERS = {
    "GPT2BPETokenizer": "GPT-2 BPE vocabulary files are not read; use PretrainedFromHF with a local tokenizer directory",
    "SentencePieceTokenizer": "its extra special tokens are not built; use GPTSentencePieceTokenizer or "
                              "Llama2Tokenizer with the same --tokenizer-model",
    "BertWordPieceLowerCase": "BERT tokenizers do not apply to GPT training",
    "BertWordPieceCase": "BERT tokenizers do not apply to GPT training",
    "TikTokenizer": "tiktoken files are not read; use PretrainedFromHF with a local tokenizer directory",
    "MultimodalTokenizer": "it belongs to the multimodal path: give --mm-model and --mm-data (the tokenizer comes "
                           "from the data configuration's model_name_or_path)",
    "NullMultimodalTokenizer": "it belongs to the multimodal path: give --mm-model and --mm-data (the tokenizer "
                               "comes from the data configuration's model_name_or_path)",
    "SFTTokenizer": "the instruction fine-tuning pipeline is not built in mm-train",
    "MagistralTokenizer": "use PretrainedFromHF with a local tokenizer directory",
}


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer to build (:func:`mm_train.data.build_tokenizer`).

    tokenizer_type: one of TOKENIZER_TYPES; tokenizer_model: a SentencePiece model file
    (Llama2Tokenizer, GPTSentencePieceTokenizer) or a local Hugging Face tokenizer directory
    (HuggingFaceTokenizer); tokenizer_name_or_path: the local Hugging Face directory of PretrainedFromHF
    (either path works for both Hugging Face types); vocab_size: NullTokenizer's ids (the vocabulary is one
    more, for end-of-document), or a floor for the others; use_fast: False for the slow Hugging Face tokenizer.
    """

    tokenizer_type: str = "ByteTokenizer"
    tokenizer_model: str | None = None
    tokenizer_name_or_path: str | None = None
    vocab_size: int | None = None
    use_fast: bool = True


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
    tokenizer: TokenizerConfig
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
    """Adds --data-path, --split, the tokenizer flags, --num-workers, --variable-seq-lengths and --mock-data
    to ``parser``."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None,
                       help="Prefixes of Megatron indexed datasets (.bin/.idx), optionally weighted: "
                            "'P1 P2' or 'W1 P1 W2 P2'. Default: the corpus that ships with mm_train.")
    group.add_argument("--split", default="969,30,1",
                       help="Train,valid,test weights splitting the documents of each dataset.")
    add_tokenizer_arguments(group)
    group.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader worker processes (0: none).")
    group.add_argument("--variable-seq-lengths", action="store_true",
                       help="One document per sample, batches padded to their longest sample.")
    group.add_argument("--mock-data", action="store_true", help="Random tokens instead of a dataset.")


def add_tokenizer_arguments(group) -> None:
    """Adds --tokenizer-type, --tokenizer-model, --tokenizer-name-or-path, --tokenizer-not-use-fast and
    --vocab-size to an argument group (mm-train's and mm-preprocess's)."""
    group.add_argument("--tokenizer-type", default="ByteTokenizer", choices=TOKENIZER_TYPES + tuple(REFUSED_TOKENIZERS))
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece model file (Llama2Tokenizer, GPTSentencePieceTokenizer) or local Hugging "
                            "Face tokenizer directory (HuggingFaceTokenizer).")
    group.add_argument("--tokenizer-name-or-path", default=None,
                       help="Local Hugging Face tokenizer directory (PretrainedFromHF); never downloaded.")
    group.add_argument("--tokenizer-not-use-fast", dest="tokenizer_use_fast", action="store_false",
                       help="The slow (Python) Hugging Face tokenizer.")
    group.add_argument("--vocab-size", type=positive_int, default=None,
                       help="NullTokenizer: ids are 0..N-1 (N is end-of-document); others: at least the "
                            "tokenizer's vocabulary (default: the tokenizer's).")


def check_tokenizer(args: argparse.Namespace) -> None:
    """A refused tokenizer type, or a type without the file or size it needs (ConfigError, one line)."""
    kind = args.tokenizer_type
    if kind in REFUSED_TOKENIZERS:
        raise ConfigError(f"--tokenizer-type {kind}: {REFUSED_TOKENIZERS[kind]}")
    if kind == "NullTokenizer" and args.vocab_size is None:
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
    if kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer") and not args.tokenizer_model:
        raise ConfigError(f"--tokenizer-type {kind} needs --tokenizer-model <SentencePiece model file>")
    if kind in ("HuggingFaceTokenizer", "PretrainedFromHF") and not (args.tokenizer_model
                                                                     or args.tokenizer_name_or_path):
        raise ConfigError(f"--tokenizer-type {kind} needs --tokenizer-name-or-path <local tokenizer directory>")


def tokenizer_config(args: argparse.Namespace) -> TokenizerConfig:
    """The :class:`TokenizerConfig` of the (checked) tokenizer flags."""
    return TokenizerConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                           tokenizer_name_or_path=args.tokenizer_name_or_path, vocab_size=args.vocab_size,
                           use_fast=args.tokenizer_use_fast)


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
    check_tokenizer(args)
    if args.tokenizer_type == "NullTokenizer" and not (args.data_path or args.mock_data):
        raise ConfigError("--tokenizer-type NullTokenizer reads token ids as stored: give --data-path (or "
                          "--mock-data)")


def to_config(args: argparse.Namespace, pad_multiple: int) -> DataConfig:
    """The :class:`DataConfig` of the (checked) data flags and the sequence, batch, seed and evaluation
    flags; ``pad_multiple`` from the sequence padding rule."""
    prefixes, weights = _parse_data_path(args.data_path) if args.data_path else ([], None)
    return DataConfig(
        data_paths=tuple(prefixes), data_weights=None if weights is None else tuple(weights),
        split=_parse_split(args.split), tokenizer=tokenizer_config(args), num_workers=args.num_workers, variable_seq_lengths=args.variable_seq_lengths,
        mock_data=args.mock_data, seq_length=args.seq_length, seed=args.seed,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, pad_multiple=pad_multiple)
