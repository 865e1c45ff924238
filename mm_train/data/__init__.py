"""Data for mm_train: tokenizers, the shipped corpus, Megatron indexed datasets and deterministic loaders.

The trainer uses two functions: ``build_tokenizer`` and ``build_data_iterators`` (micro-batches of one
data-parallel rank, resumable from consumed samples). The flags and :class:`DataConfig` are the data
feature's (:mod:`mm_train.features.data`).
"""

from mm_train.data.documents import default_corpus_path
from mm_train.data.loader import build_data_iterators
from mm_train.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HuggingFaceTokenizer",
    "build_data_iterators",
    "build_tokenizer",
    "default_corpus_path",
]
