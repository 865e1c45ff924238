"""Tokenizers and datasets for the tiny launch scripts of this folder, made locally from the corpus that
ships with mm_train (nothing is downloaded).

    python examples/make_tiny_assets.py [OUT]      (default data/tiny)

writes under OUT:

- ``hf_tokenizer/``: a byte-level BPE tokenizer (512 ids, end of text ``<|endoftext|>``) in the Hugging
  Face format, for ``--tokenizer-type PretrainedFromHF --tokenizer-name-or-path OUT/hf_tokenizer``;
- ``spm.model``: a SentencePiece BPE model (500 ids, Llama's special ids: unk 0, bos 1, eos 2, no pad), for
  ``--tokenizer-type Llama2Tokenizer --tokenizer-model OUT/spm.model``;
- ``corpus.jsonl``: the corpus, one document per line, and ``ids.jsonl``: the same documents as UTF-8
  byte ids written out as numbers (what ``NullTokenizer --vocab-size 256`` reads);
- the indexed datasets of each, for ``--data-path``: ``llama2_text_document``, ``hf_text_document``,
  ``ids_text_document`` (built with ``mm-preprocess --append-eod``).

Needs the ``tokenizers``, ``transformers`` and ``sentencepiece`` packages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mm_train.data import default_corpus_path
from mm_train.data.documents import split_text_documents
from mm_train.data.preprocess import main as preprocess


def write_jsonl(path: Path, documents: list[str]) -> None:
    """One ``{"text": ...}`` object per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}) + "\n")


def make_hf_tokenizer(corpus: Path, out: Path) -> None:
    """A byte-level BPE tokenizer trained on ``corpus``, saved with its config for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train([str(corpus)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(out)


def make_sentencepiece(corpus: Path, prefix: Path) -> None:
    """A SentencePiece BPE model with Llama's special ids trained on ``corpus``: ``prefix``.model."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=500, model_type="bpe", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)


def make_assets(out: Path) -> None:
    """Writes everything listed in the module doc under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    documents = split_text_documents(default_corpus_path().read_text(encoding="utf-8"))
    write_jsonl(out / "corpus.jsonl", documents)
    write_jsonl(out / "ids.jsonl", [" ".join(str(byte) for byte in text.encode("utf-8")) for text in documents])
    make_hf_tokenizer(default_corpus_path(), out / "hf_tokenizer")
    make_sentencepiece(default_corpus_path(), out / "spm")
    builds = {
        "llama2": (out / "corpus.jsonl", ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                          str(out / "spm.model")]),
        "hf": (out / "corpus.jsonl", ["--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path",
                                      str(out / "hf_tokenizer")]),
        "ids": (out / "ids.jsonl", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "256"]),
    }
    for name, (source, tokenizer) in builds.items():
        preprocess(["--input", str(source), "--output-prefix", str(out / name), "--append-eod", *tokenizer])


if __name__ == "__main__":
    make_assets(Path(sys.argv[1] if len(sys.argv) > 1 else "data/tiny"))
