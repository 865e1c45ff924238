"""mm_train.data: tokenizers, mm-preprocess, sample streams and the deterministic, resumable loaders."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_train.data import (
    ByteTokenizer,
    build_data_iterators,
    build_tokenizer,
    default_corpus_path,
    make_corpus,
    preprocess,
)
from mm_train.data.documents import IndexedDocuments, InMemoryDocuments, indexed_dataset_module, split_ranges
from mm_train.data.loader import build_sample_streams, consumed_valid_samples
from mm_train.data.samples import BlendedStream, DocumentStream, PackedStream
from mm_train.errors import ConfigError, DataError
from mm_train.features import data as data_feature
from mm_train.features.context_parallel import ContextParallelConfig, sequence_multiple
from mm_train.features.data import DataConfig

ROOT = Path(__file__).resolve().parent.parent
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

TEXTS = [
    "The heron waited at the mill pond until the fog lifted.",
    "Ledger: 3 lamps, 7 cups. Items sold: 10.",
    "Zürich, Kraków and Tōkyō are not in the corpus \u2014 but bytes are bytes.",
    "short",
    "",
    "def add_3(x):\n    return x + 3",
] + [f"Document {i}: " + "counting " * (i % 7) + f"ends at {i * 3}." for i in range(40)]


def make_config(*argv: str, seq_length: int = 16, micro_batch_size: int = 2, global_batch_size: int = 8,
                seed: int = 1234, eval_iters: int = 2, eval_interval: int = 5, pad_multiple: int = 1) -> DataConfig:
    """The DataConfig of the data flags in ``argv`` (checked as the command line checks them) plus the
    trainer-owned values the data code reads."""
    parser = argparse.ArgumentParser()
    data_feature.add_arguments(parser)
    args = parser.parse_args(["--num-workers", "0", *argv])
    vars(args).update(seq_length=seq_length, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                      seed=seed, eval_iters=eval_iters, eval_interval=eval_interval)
    data_feature.check(args)
    return data_feature.to_config(args, pad_multiple)


def tokenizer_of(config: DataConfig):
    return build_tokenizer(config.tokenizer)


def take(iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(iterator) for _ in range(count)]


def global_batches(config: DataConfig, dp_size: int, count: int, consumed: int = 0,
                   valid: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` global batches, each the rank-ordered concatenation of all DP ranks' micro-batches."""
    tokenizer = tokenizer_of(config)
    per_rank_micro = config.global_batch_size // (config.micro_batch_size * dp_size)
    ranks = []
    for rank in range(dp_size):
        train, valid_iterator = build_data_iterators(config, tokenizer, consumed, rank, dp_size)
        ranks.append(take(valid_iterator if valid else train, count * per_rank_micro))
    batches = []
    for i in range(count):
        micro = [ranks[r][i * per_rank_micro + m] for r in range(dp_size) for m in range(per_rank_micro)]
        batches.append({key: torch.cat([mb[key] for mb in micro]) for key in micro[0]})
    return batches


def assert_same_batches(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in e:
            assert a[key].dtype == e[key].dtype, key
            assert torch.equal(a[key], e[key]), key


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(TEXTS):
            handle.write(json.dumps({"text": text, "title": f"title {i}"}) + "\n")
            if i == 2:
                handle.write("\n")
    return path


@pytest.fixture(scope="module")
def indexed_prefix(jsonl, tmp_path_factory) -> str:
    """The JSONL preprocessed in-process (main(argv)) with --append-eod: prefix of its 'text' dataset."""
    out = tmp_path_factory.mktemp("indexed") / "docs"
    preprocess.main(["--input", str(jsonl), "--json-keys", "text", "title", "--output-prefix", str(out),
                     "--tokenizer-type", "ByteTokenizer", "--append-eod"])
    return f"{out}_text_document"


# Tokenizers

def test_byte_tokenizer_round_trip():
    tokenizer = tokenizer_of(make_config())
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (258, 256, 257)
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize([104, 105, tokenizer.eod, 33, tokenizer.pad]) == "hi!"


def test_byte_tokenizer_vocab_size():
    assert tokenizer_of(make_config("--vocab-size", "512")).vocab_size == 512
    with pytest.raises(ValueError, match="--vocab-size 100"):
        tokenizer_of(make_config("--vocab-size", "100"))


def test_hf_tokenizer_without_transformers(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "transformers" else find_spec(name, *rest))
    with pytest.raises(ConfigError, match="HuggingFaceTokenizer needs the 'transformers' package, which is not "
                                          "installed"):
        tokenizer_of(make_config("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)))


def test_hf_tokenizer_needs_local_directory(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-name-or-path"):
        tokenizer_of(make_config("--tokenizer-type", "HuggingFaceTokenizer"))
    with pytest.raises(ValueError, match="local directory"):
        tokenizer_of(make_config("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                 str(tmp_path / "missing")))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_hf_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TEXTS[:2] for w in text.split()})
    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = tokenizer_of(make_config("--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)))
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (len(vocab), 0, 0)
    ids = tokenizer.tokenize(TEXTS[0])
    assert ids == [vocab[w] for w in TEXTS[0].split()]
    assert tokenizer.detokenize(ids).split() == TEXTS[0].split()
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:2]) + "\n")
    preprocess.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "hf"), "--append-eod",
                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path)])
    documents = IndexedDocuments(str(tmp_path / "hf_text_document"))
    for index, text in enumerate(TEXTS[:2]):
        expected = tokenizer.tokenize(text) + [tokenizer.eod]
        assert documents.read(index, 0, int(documents.lengths[index])).tolist() == expected


# mm-preprocess and indexed datasets

def test_preprocess_reads_back_the_same_tokens(indexed_prefix):
    tokenizer = ByteTokenizer()
    expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in TEXTS if t]
    documents = IndexedDocuments(indexed_prefix)
    assert documents.lengths.tolist() == [len(d) for d in expected]
    for index, document in enumerate(expected):
        assert documents.read(index, 0, len(document)).tolist() == document
        assert documents.read(index, 2, 3).tolist() == document[2:5]
    titles = IndexedDocuments(indexed_prefix.replace("_text_", "_title_"))
    assert titles.read(1, 0, int(titles.lengths[1])).tolist() == tokenizer.tokenize("title 1") + [tokenizer.eod]
    megatron = indexed_dataset_module().IndexedDataset(indexed_prefix)
    assert megatron.index.dtype == np.uint16
    assert megatron[0].tolist() == expected[0]


def test_preprocess_entry_point_with_workers(jsonl, indexed_prefix, tmp_path):
    out = tmp_path / "workers"
    result = subprocess.run(
        [sys.executable, "-m", "mm_train.data.preprocess", "--input", str(jsonl), "--json-keys", "text",
         "--output-prefix", str(out), "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{out}_text_document.bin/.idx: {sum(1 for t in TEXTS if t)} documents" in result.stdout
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}_text_document{suffix}").read_bytes() == Path(indexed_prefix + suffix).read_bytes()


def test_preprocess_without_eod(jsonl, tmp_path):
    preprocess.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "plain")])
    documents = IndexedDocuments(str(tmp_path / "plain_text_document"))
    assert documents.read(0, 0, int(documents.lengths[0])).tolist() == list(TEXTS[0].encode())


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not valid JSON"),
    ('{"body": "x"}', "line 2 has no key 'text'"),
    ('{"text": 3}', "line 2: 'text' must be a string"),
    ('["text"]', "line 2 must be a JSON object"),
])
def test_preprocess_bad_input_exits_with_message(tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--input", str(path), "--output-prefix", str(tmp_path / "out")])
    assert message in str(exit_info.value.code)
    assert not list(tmp_path.glob("out*")), "partial outputs must be removed"


def test_preprocess_missing_input(tmp_path):
    with pytest.raises(SystemExit, match="--input .* is not a file"):
        preprocess.main(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "out")])


# Sample streams

def unique_id_documents(lengths: list[int]) -> InMemoryDocuments:
    """Documents whose ids are all distinct and consecutive within a document."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return InMemoryDocuments([np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))])


def test_packed_stream_windows_cover_each_token_once():
    lengths = [5, 17, 1, 9, 30, 2, 11]
    documents = unique_id_documents(lengths)
    stream = PackedStream(documents, np.arange(len(lengths)), seq_length=8, seed=7, key=(0, 0))
    n = stream.samples_per_cycle
    assert n == (sum(lengths) - 1) // 8
    samples = [stream.sample(k) for k in range(n)]
    assert all(len(s) == 9 for s in samples)
    labels = np.concatenate([s[1:] for s in samples])
    assert len(np.unique(labels)) == n * 8, "every id is the label of one position at most"
    document_of = np.repeat(np.arange(len(lengths)), lengths)
    for s in samples:
        for a, b in zip(s[:-1], s[1:], strict=True):
            assert b == a + 1 or (document_of[b] != document_of[a] and b == np.cumsum([0] + lengths)[document_of[b]]
                                  and a == np.cumsum(lengths)[document_of[a]] - 1), "windows join whole documents"
    next_cycle = [stream.sample(n + k).tolist() for k in range(n)]
    assert next_cycle != [s.tolist() for s in samples], "a new cycle reshuffles"


def test_packed_stream_with_fewer_tokens_than_a_window():
    stream = PackedStream(unique_id_documents([3, 4]), np.arange(2), seq_length=16, seed=1, key=(0, 1))
    assert stream.samples_per_cycle >= 1
    assert len(stream.sample(0)) == 17 and len(stream.sample(5)) == 17


def test_document_stream_truncates_and_skips_tiny_documents():
    lengths = [1, 3, 40, 12]
    stream = DocumentStream(unique_id_documents(lengths), np.arange(4), seq_length=10, seed=3, key=(0, 0))
    assert stream.samples_per_cycle == 3
    firsts = sorted(int(stream.sample(k)[0]) for k in range(3))
    assert firsts == [1, 4, 44]
    for k in range(6):
        assert len(stream.sample(k)) == stream.length(k) == min(lengths[[0, 1, 4, 44].index(int(stream.sample(k)[0]))], 11)


class CountingStream:
    """Sample k of stream ``tag`` is [tag, k]."""

    def __init__(self, tag: int) -> None:
        self.tag = tag

    def length(self, k: int) -> int:
        return 2

    def sample(self, k: int) -> np.ndarray:
        return np.array([self.tag, k])


def test_blended_stream_follows_weights_and_reads_each_stream_in_order():
    stream = BlendedStream([CountingStream(0), CountingStream(1)], [1.0, 3.0], period=64)
    samples = np.stack([stream.sample(k) for k in range(256)])
    assert (samples[:, 0] == 1).sum() == 192
    for tag in (0, 1):
        positions = samples[samples[:, 0] == tag, 1]
        assert positions.tolist() == list(range(len(positions)))
    assert all((samples[k:k + 4, 0] == 1).sum() == 3 for k in range(0, 256, 4))


def test_split_ranges():
    assert split_ranges(1000, (0.969, 0.030, 0.001)) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(10, (1.0, 0.0, 0.0)) == [(0, 10), (10, 10), (10, 10)]


# Loaders

@pytest.mark.parametrize("variable", [False, True])
def test_global_batch_is_the_same_for_any_dp_size(indexed_prefix, variable):
    flags = ["--data-path", indexed_prefix, "--split", "90,10,0"] + (["--variable-seq-lengths"] if variable else [])
    config = make_config(*flags, micro_batch_size=1)
    single = global_batches(config, dp_size=1, count=4)
    for dp_size in (2, 4):
        assert_same_batches(global_batches(config, dp_size=dp_size, count=4), single)
    config = dataclasses.replace(config, micro_batch_size=2)
    assert_same_batches(global_batches(config, dp_size=2, count=4), single)
    assert not torch.equal(single[0]["tokens"], single[1]["tokens"])


@pytest.mark.parametrize("flags", [[], ["--variable-seq-lengths"], ["--mock-data"]])
def test_resume_from_consumed_samples_is_exact(flags):
    config = make_config(*flags)
    uninterrupted = global_batches(config, dp_size=2, count=7)
    resumed = global_batches(config, dp_size=2, count=4, consumed=3 * config.global_batch_size)
    assert_same_batches(resumed, uninterrupted[3:])


def test_valid_iterator_resumes_where_evaluations_left_off():
    config = make_config(eval_iters=2, eval_interval=5)
    assert consumed_valid_samples(config, 12 * config.global_batch_size) == 2 * 2 * config.global_batch_size
    uninterrupted = global_batches(config, dp_size=1, count=6, valid=True)
    resumed = global_batches(config, dp_size=1, count=2, consumed=12 * config.global_batch_size, valid=True)
    assert_same_batches(resumed, uninterrupted[4:])


def test_worker_processes_keep_the_order():
    config = make_config("--variable-seq-lengths")
    serial = global_batches(config, dp_size=1, count=3)
    config = dataclasses.replace(config, num_workers=2)
    assert_same_batches(global_batches(config, dp_size=1, count=3), serial)


def test_seed_changes_the_order():
    assert not torch.equal(global_batches(make_config(seed=1), 1, 1)[0]["tokens"],
                           global_batches(make_config(seed=2), 1, 1)[0]["tokens"])


def test_packed_batches_shapes_labels_and_masks():
    config = make_config(seq_length=32)
    tokenizer = tokenizer_of(config)
    train, valid = build_data_iterators(config, tokenizer, 0, 0, 1)
    for batch in take(train, 4) + take(valid, 2):
        assert batch["tokens"].shape == batch["labels"].shape == (2, 32)
        assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        assert torch.equal(batch["position_ids"], torch.arange(32).expand(2, 32))
    text = tokenizer.detokenize(batch["tokens"][0].tolist())
    assert text in default_corpus_path().read_text().replace("\n\n", "")


def test_variable_seq_lengths_pad_to_the_longest_of_the_global_batch(indexed_prefix):
    seq_length = 64
    config = make_config("--data-path", indexed_prefix, "--split", "1", "--variable-seq-lengths",
                         seq_length=seq_length, micro_batch_size=2, global_batch_size=4)
    tokenizer = tokenizer_of(config)
    documents = [tokenizer.tokenize(t) + [tokenizer.eod] for t in TEXTS if t]
    truncated_documents = [d[:seq_length + 1] for d in documents]
    train, _ = build_data_iterators(config, tokenizer, 0, 0, 1)
    lengths = set()
    for _ in range(10):
        pair = take(train, 2)
        assert pair[0]["tokens"].shape == pair[1]["tokens"].shape
        width = pair[0]["tokens"].shape[1]
        lengths.add(width)
        longest = 0
        for batch in pair:
            for row in range(2):
                tokens, labels, mask = batch["tokens"][row], batch["labels"][row], batch["loss_mask"][row]
                real = int(mask.sum())
                sample = tokens[:real].tolist() + [int(labels[real - 1])]
                assert labels[:real].tolist() == sample[1:]
                assert sample in truncated_documents
                assert mask[:real].eq(1).all() and mask[real:].eq(0).all()
                assert tokens[real:].eq(tokenizer.pad).all() and labels[real:].eq(tokenizer.pad).all()
                longest = max(longest, real)
        assert width == longest <= seq_length
    assert len(lengths) > 1, "widths follow the batches"


def test_variable_seq_lengths_keep_the_sequence_parallel_multiple():
    config = make_config("--variable-seq-lengths", "--mock-data", seq_length=64,
                         pad_multiple=sequence_multiple(ContextParallelConfig(), tensor_model_parallel_size=4,
                                                        sequence_parallel=True))
    train, _ = build_data_iterators(config, tokenizer_of(config), 0, 0, 1)
    widths = [next(train)["tokens"].shape[1] for _ in range(12)]
    assert all(w % 4 == 0 for w in widths) and len(set(widths)) > 1


def test_mock_data_is_random_tokens_in_the_vocabulary():
    config = make_config("--mock-data", "--vocab-size", "300")
    batch = global_batches(config, 1, 1)[0]
    assert batch["tokens"].max() < 300 and batch["tokens"].unique().numel() > 50


def test_train_and_valid_use_disjoint_documents(indexed_prefix):
    config = make_config("--data-path", indexed_prefix, "--split", "70,30,0", "--variable-seq-lengths", seq_length=200)
    train, valid, _ = build_sample_streams(config, tokenizer_of(config))
    train_docs = {tuple(train.sample(k)) for k in range(200)}
    valid_docs = {tuple(valid.sample(k)) for k in range(100)}
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert len(train_docs) + len(valid_docs) == sum(1 for t in TEXTS if t)


def test_weighted_data_paths_blend(indexed_prefix, jsonl, tmp_path):
    preprocess.main(["--input", str(jsonl), "--json-keys", "title", "--output-prefix", str(tmp_path / "t")])
    titles = str(tmp_path / "t_title_document")
    config = make_config("--data-path", "0.25", indexed_prefix, "0.75", titles, "--split", "1",
                         "--variable-seq-lengths", seq_length=200)
    train, _, _ = build_sample_streams(config, tokenizer_of(config))
    from_titles = sum(bytes(train.sample(k)[:5].tolist()) == b"title" for k in range(400))
    assert from_titles == 300


def test_unweighted_data_paths_are_concatenated(indexed_prefix):
    config = make_config("--data-path", indexed_prefix, indexed_prefix.replace("_text_", "_title_"), "--split", "1",
                         "--variable-seq-lengths", seq_length=200)
    train, _, _ = build_sample_streams(config, tokenizer_of(config))
    documents = [tuple(train.sample(k)) for k in range(2 * len(TEXTS))]
    tokenizer = ByteTokenizer()
    expected = [tokenizer.tokenize(t) + [tokenizer.eod] for t in TEXTS if t]
    expected += [tokenizer.tokenize(f"title {i}") + [tokenizer.eod] for i in range(len(TEXTS))]
    assert sorted(documents[:len(expected)]) == sorted(tuple(d) for d in expected)


@pytest.mark.parametrize("flags, kwargs, message", [
    (["--data-path", "/nonexistent/prefix"], {}, "mm-preprocess"),
    (["--mock-data", "--data-path", "x"], {}, "exclude each other"),
    (["--split", "a,b"], {}, "--split"),
    (["--data-path", "1", "x", "2"], {}, "pairs"),
    ([], {"global_batch_size": 7}, "--global-batch-size 7"),
    ([], {"seed": -1}, "--seed"),
])
def test_bad_data_arguments_are_refused(flags, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config = make_config(*flags, **kwargs)
        build_data_iterators(config, tokenizer_of(config), 0, 0, 1)


def test_resume_with_another_global_batch_size_goes_on_with_the_next_sample():
    config = make_config(global_batch_size=8)
    uninterrupted = torch.cat([batch["tokens"] for batch in global_batches(config, dp_size=1, count=3)])
    smaller = dataclasses.replace(config, global_batch_size=4)
    resumed = torch.cat([batch["tokens"] for batch in global_batches(smaller, dp_size=2, count=4, consumed=8)])
    assert torch.equal(resumed, uninterrupted[8:])
    with pytest.raises(ValueError, match="consumed_train_samples"):
        build_data_iterators(config, tokenizer_of(config), -1, 0, 1)


def test_tokens_outside_the_vocabulary_are_reported(tmp_path):
    module = indexed_dataset_module()
    prefix = str(tmp_path / "wide")
    builder = module.IndexedDatasetBuilder(module.get_bin_path(prefix), dtype=np.uint16)
    builder.add_document(np.arange(300, 340), [40])
    builder.finalize(module.get_idx_path(prefix))
    config = make_config("--data-path", prefix, "--split", "1", "--num-workers", "1")
    train, _ = build_data_iterators(config, tokenizer_of(config), 0, 0, 1)
    with pytest.raises(DataError, match=r"^token id 3\d\d of --data-path is outside the vocabulary of 258: was "
                                        r"the data built with another tokenizer\?$"):
        next(train)


# The shipped corpus

def test_data_flags_defaults():
    parser = argparse.ArgumentParser()
    data_feature.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.data_path, args.split, args.tokenizer_type, args.tokenizer_model, args.vocab_size) == (
        None, "969,30,1", "ByteTokenizer", None, None)
    assert not args.variable_seq_lengths and not args.mock_data and args.num_workers == 2
    config = make_config()
    assert (config.data_paths, config.data_weights, config.split) == ((), None, (0.969, 0.03, 0.001))


def test_corpus_is_what_the_generator_writes():
    text = default_corpus_path().read_text(encoding="utf-8")
    assert 200 * 1024 < len(text.encode()) < 1024 * 1024
    assert text == make_corpus.generate()


def test_default_corpus_is_found_when_installed(tmp_path):
    """Builds the pure-Python part of the distribution and imports mm_train.data from there."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mm_train", source / "mm_train", ignore=shutil.ignore_patterns("__pycache__"))
    build = tmp_path / "installed"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(build)], cwd=source, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(build)}
    result = subprocess.run([sys.executable, "-c", "import mm_train.data as d; print(d.default_corpus_path())"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True)
    installed = Path(result.stdout.strip())
    assert installed.is_relative_to(build)
    assert installed.read_bytes() == default_corpus_path().read_bytes()
