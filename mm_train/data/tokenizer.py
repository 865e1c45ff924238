"""Tokenizers: a byte-level one that needs no files, and Hugging Face tokenizers from a local directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mm_train.features.data import TOKENIZER_TYPES


def _checked_vocab_size(own_size: int, requested: int | None, tokenizer_type: str) -> int:
    """``requested`` (--vocab-size) when given and large enough, else ``own_size``."""
    if requested is None:
        return own_size
    if requested < own_size:
        raise ValueError(f"--vocab-size {requested} is smaller than the {own_size} ids of {tokenizer_type}")
    return requested


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

    ``eod`` is the tokenizer's end-of-sequence id; ``pad`` its padding id, or ``eod`` when it has none.
    """

    def __init__(self, path: str | None, vocab_size: int | None = None) -> None:
        if not path:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model <local directory>")
        if not Path(path).is_dir():
            raise ValueError(f"--tokenizer-model must be a local directory holding a tokenizer, got {path!r}")
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ImportError("--tokenizer-type HuggingFaceTokenizer needs the 'transformers' package, "
                              "which is not installed (pip install transformers)") from error
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self._tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"the tokenizer in --tokenizer-model {path!r} defines no end-of-sequence token")
        self.eod = int(eos)
        pad = self._tokenizer.pad_token_id
        self.pad = self.eod if pad is None else int(pad)
        self.vocab_size = _checked_vocab_size(len(self._tokenizer), vocab_size, "HuggingFaceTokenizer")

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens added."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._tokenizer.decode([int(i) for i in ids])


def build_tokenizer(tokenizer_type: str = "ByteTokenizer", tokenizer_model: str | None = None,
                    vocab_size: int | None = None) -> ByteTokenizer | HuggingFaceTokenizer:
    """The tokenizer of --tokenizer-type (with --tokenizer-model, a local directory, and --vocab-size)."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, vocab_size)
    raise ValueError(f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {tokenizer_type!r}")
