"""Tokenizers, with Megatron's and MindSpeed-LLM's ``--tokenizer-type`` names.

- ``ByteTokenizer`` (mm-train's default): UTF-8 bytes, needs no files;
- ``PretrainedFromHF`` / ``HuggingFaceTokenizer``: a ``transformers`` tokenizer from a local directory
  (``--tokenizer-name-or-path`` or ``--tokenizer-model``; never downloaded);
- ``Llama2Tokenizer`` / ``GPTSentencePieceTokenizer``: a SentencePiece model file (``--tokenizer-model``);
  Llama2's ``tokenize`` starts every text with the beginning-of-sequence id, as Megatron's does;
- ``NullTokenizer``: the ids are stored as they are (text "3 1 4" is ids 3, 1, 4); ``--vocab-size N``
  ids plus end-of-document N, so the vocabulary is N + 1.

Each has ``vocab_size``, ``eod`` (end of document, appended by ``mm-preprocess --append-eod``), ``pad``
(what padded positions hold; they never count in the loss), ``tokenize`` and ``detokenize``. A file
that is missing or unreadable is a :class:`mm_train.errors.ConfigError` naming the flag.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from mm_train.errors import ConfigError, first_line
from mm_train.features.data import TokenizerConfig


def _checked_vocab_size(own_size: int, requested: int | None, tokenizer_type: str) -> int:
    """``requested`` (--vocab-size) when given and large enough, else ``own_size``."""
    if requested is None:
        return own_size
    if requested < own_size:
        raise ConfigError(f"--vocab-size {requested} is smaller than the {own_size} ids of {tokenizer_type}")
    return requested


def _require(module: str, tokenizer_type: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--tokenizer-type {tokenizer_type} needs the '{package}' package, which is not installed "
                          f"(pip install {package})")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, then end-of-document (256) and padding (257). Needs no files.

    ``vocab_size`` may be raised above 258 (``--vocab-size``); the extra ids are never produced.
    """

    NUM_BYTES = 256

    def __init__(self, vocab_size: int | None = None) -> None:
        self.eod = self.NUM_BYTES
        self.pad = self.NUM_BYTES + 1
        self.vocab_size = _checked_vocab_size(self.NUM_BYTES + 2, vocab_size, "ByteTokenizer")

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ids."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES).decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A ``transformers`` tokenizer loaded from a local directory (never downloads).

    ``eod`` is the tokenizer's end-of-sequence id; ``pad`` its padding id, or ``eod`` when it has none;
    ``vocab_size`` is ``len(tokenizer)`` (added tokens included), or --vocab-size when larger.
    """

    def __init__(self, path: str | None, vocab_size: int | None = None, use_fast: bool = True,
                 tokenizer_type: str = "HuggingFaceTokenizer") -> None:
        if not path:
            raise ConfigError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-name-or-path <local directory>")
        if not Path(path).is_dir():
            raise ConfigError(f"--tokenizer-name-or-path / --tokenizer-model must be a local directory holding a "
                              f"tokenizer, got {path!r}")
        _require("transformers", tokenizer_type, "transformers")
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=use_fast)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load the tokenizer in {path}: {first_line(error)}") from None
        eos = self._tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"the tokenizer in {path!r} defines no end-of-sequence token")
        self.eod = int(eos)
        pad = self._tokenizer.pad_token_id
        self.pad = self.eod if pad is None else int(pad)
        self.vocab_size = _checked_vocab_size(len(self._tokenizer), vocab_size, tokenizer_type)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens added."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._tokenizer.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece model file: ``Llama2Tokenizer`` (``bos`` True: every text starts with the
    beginning-of-sequence id) or ``GPTSentencePieceTokenizer`` (``bos`` False). ``eod`` is the model's
    end-of-sequence id; ``pad`` its padding id, or ``eod`` when it has none (Llama's has none)."""

    def __init__(self, path: str | None, tokenizer_type: str, bos: bool, vocab_size: int | None = None) -> None:
        if not path or not Path(path).is_file():
            raise ConfigError(f"--tokenizer-model must be a SentencePiece model file for {tokenizer_type}, got {path!r}")
        _require("sentencepiece", tokenizer_type, "sentencepiece")
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise ConfigError(f"--tokenizer-model {path} is not a SentencePiece model ({error})") from None
        self._bos = bos
        if self._processor.eos_id() < 0:
            raise ConfigError(f"the SentencePiece model {path} defines no end-of-sequence piece")
        self.eod = self._processor.eos_id()
        self.pad = self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eod
        self.vocab_size = _checked_vocab_size(self._processor.get_piece_size(), vocab_size, tokenizer_type)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` (after the beginning-of-sequence id for Llama2Tokenizer)."""
        ids = list(self._processor.encode(text))
        return [self._processor.bos_id(), *ids] if self._bos else ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._processor.decode([int(i) for i in ids])


class NullTokenizer:
    """Ids as stored: ``tokenize("3 1 4")`` is [3, 1, 4]. Ids 0..vocab_size-1 are the data's, ``eod`` is
    ``vocab_size`` and the vocabulary is ``vocab_size + 1`` (Megatron's NullTokenizer); ``pad`` is ``eod``."""

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
        self.eod = vocab_size
        self.pad = vocab_size
        self.vocab_size = vocab_size + 1

    def tokenize(self, text: str) -> list[int]:
        """The whitespace-separated integers of ``text``."""
        try:
            return [int(item) for item in text.split()]
        except ValueError:
            raise ConfigError(f"NullTokenizer reads whitespace-separated integers, got {text[:40]!r}") from None

    def detokenize(self, ids: Sequence[int]) -> str:
        """The ids as text."""
        return " ".join(str(int(i)) for i in ids)


Tokenizer = ByteTokenizer | HuggingFaceTokenizer | SentencePieceTokenizer | NullTokenizer


def build_tokenizer(config: TokenizerConfig | None = None) -> Tokenizer:
    """The tokenizer of --tokenizer-type and its flags (the byte tokenizer by default)."""
    config = config or TokenizerConfig()
    kind = config.tokenizer_type
    if kind == "ByteTokenizer":
        return ByteTokenizer(config.vocab_size)
    if kind in ("HuggingFaceTokenizer", "PretrainedFromHF"):
        return HuggingFaceTokenizer(config.tokenizer_name_or_path or config.tokenizer_model, config.vocab_size,
                                    config.use_fast, kind)
    if kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(config.tokenizer_model, kind, bos=kind == "Llama2Tokenizer",
                                      vocab_size=config.vocab_size)
    if kind == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    raise ConfigError(f"--tokenizer-type {kind} is not supported by mm-train")
