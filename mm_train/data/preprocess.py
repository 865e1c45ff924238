"""mm-preprocess: JSONL documents -> Megatron indexed datasets (.bin/.idx) for ``--data-path``.

Each line of --input is a JSON object; the text under every --json-keys key is tokenized into one
document of ``{output_prefix}_{key}_document.bin/.idx`` (the prefix to pass to --data-path).
Empty documents are skipped. --workers > 1 tokenizes in that many processes; the output is the same.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mm_train.data.documents import indexed_dataset_module
from mm_train.data.tokenizer import build_tokenizer
from mm_train.features.data import TokenizerConfig, add_tokenizer_arguments, check_tokenizer, tokenizer_config

_worker_tokenizer = None


def build_parser() -> argparse.ArgumentParser:
    """The mm-preprocess argument parser."""
    parser = argparse.ArgumentParser(
        prog="mm-preprocess", description="Builds Megatron indexed datasets (.bin/.idx) for --data-path from JSONL.")
    parser.add_argument("--input", required=True, help="JSONL file, one JSON object per line.")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="Keys whose text becomes documents.")
    parser.add_argument("--output-prefix", required=True,
                        help="Writes {prefix}_{key}_document.bin and .idx for each key.")
    add_tokenizer_arguments(parser)
    parser.add_argument("--append-eod", action="store_true", help="End every document with the eod token.")
    parser.add_argument("--workers", type=int, default=1, help="Tokenizer processes.")
    return parser


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _encode(tokenizer, json_keys: list[str], append_eod: bool, path: str, numbered_line: tuple[int, str]) -> list[np.ndarray]:
    """Ids of each key's text on one JSONL line (int64 arrays, in --json-keys order)."""
    number, line = numbered_line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {number} is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {number} must be a JSON object, got {type(record).__name__}")
    documents = []
    for key in json_keys:
        if key not in record:
            raise ValueError(f"{path} line {number} has no key {key!r} (--json-keys)")
        if not isinstance(record[key], str):
            raise ValueError(f"{path} line {number}: {key!r} must be a string, got {type(record[key]).__name__}")
        ids = tokenizer.tokenize(record[key])
        if append_eod and ids:
            ids.append(tokenizer.eod)
        documents.append(np.array(ids, dtype=np.int64))
    return documents


def _init_worker(config: TokenizerConfig) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(config)


def _encode_in_worker(job: tuple[list[str], bool, str, tuple[int, str]]) -> list[np.ndarray]:
    return _encode(_worker_tokenizer, *job)


def output_prefixes(output_prefix: str, json_keys: list[str]) -> list[str]:
    """The --data-path prefix written for each key."""
    return [f"{output_prefix}_{key}_document" for key in json_keys]


def preprocess(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """Writes the indexed datasets for the parsed mm-preprocess command line; returns (prefix,
    documents, tokens) per key."""
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input} is not a file")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    check_tokenizer(args)
    config = tokenizer_config(args)
    tokenizer = build_tokenizer(config)
    module = indexed_dataset_module()
    dtype = module.DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = output_prefixes(args.output_prefix, args.json_keys)
    Path(prefixes[0]).parent.mkdir(parents=True, exist_ok=True)
    builders = [module.IndexedDatasetBuilder(module.get_bin_path(prefix), dtype=dtype) for prefix in prefixes]
    documents = [0] * len(prefixes)
    tokens = [0] * len(prefixes)
    jobs = ((args.json_keys, args.append_eod, args.input, numbered) for numbered in _numbered_lines(args.input))
    try:
        if args.workers == 1:
            encoded = (_encode(tokenizer, *job) for job in jobs)
            _write(encoded, builders, documents, tokens)
        else:
            with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(config,)) as pool:
                _write(pool.imap(_encode_in_worker, jobs, chunksize=64), builders, documents, tokens)
        for builder, prefix in zip(builders, prefixes, strict=True):
            builder.finalize(module.get_idx_path(prefix))
    except BaseException:
        for builder, prefix in zip(builders, prefixes, strict=True):
            builder.data_file.close()
            for path in (module.get_bin_path(prefix), module.get_idx_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
        raise
    return list(zip(prefixes, documents, tokens, strict=True))


def _write(encoded: Iterator[list[np.ndarray]], builders: list, documents: list[int], tokens: list[int]) -> None:
    for per_key in encoded:
        for index, ids in enumerate(per_key):
            if len(ids):
                builders[index].add_document(ids, [len(ids)])
                documents[index] += 1
                tokens[index] += len(ids)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; errors end the process with a one-line message and status 1."""
    args = build_parser().parse_args(argv)
    try:
        results = preprocess(args)
    except (ValueError, ImportError, OSError) as error:
        sys.exit(f"mm-preprocess: error: {error}")
    for prefix, documents, tokens in results:
        print(f"{prefix}.bin/.idx: {documents} documents, {tokens} tokens")


if __name__ == "__main__":
    main()
