"""Temporary stand-in for mm_train.data (built on another branch) so the trainer tests run before it lands.

Implements the interface contract with a byte tokenizer over a generated text, packed fixed-length
samples in a seeded order. Installed by tests/train_launch.py only when mm_train.data is missing.
"""

from __future__ import annotations

import sys
import types

import torch

WORDS = "the a model trains on text and learns to predict next byte of every word in this small corpus".split()


class ByteTokenizer:
    vocab_size, eod, pad = 258, 256, 257

    def tokenize(self, text):
        return list(text.encode())

    def detokenize(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="*", default=None)
    group.add_argument("--split", default="969,30,1")
    group.add_argument("--tokenizer-type", default="ByteTokenizer")
    group.add_argument("--tokenizer-model", default=None)
    group.add_argument("--vocab-size", type=int, default=None)
    group.add_argument("--num-workers", type=int, default=2)
    group.add_argument("--variable-seq-lengths", action="store_true")
    group.add_argument("--mock-data", action="store_true")


def build_tokenizer(args):
    return ByteTokenizer()


def _stream(seed):
    g = torch.Generator().manual_seed(seed)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200000,), generator=g)) + "."
    return torch.tensor(list(text.encode()), dtype=torch.int64)


def _iterator(args, stream, start_sample, dp_rank, dp_size):
    s, mbs, gbs = args.seq_length, args.micro_batch_size, args.global_batch_size
    n_samples = (len(stream) - 1) // s
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(args.seed))
    per_rank = gbs // dp_size
    batch = start_sample // gbs
    while True:
        first = batch * gbs + dp_rank * per_rank
        for m in range(per_rank // mbs):
            idx = [int(order[(first + m * mbs + j) % n_samples]) for j in range(mbs)]
            rows = torch.stack([stream[i * s:i * s + s + 1] for i in idx])
            yield {"tokens": rows[:, :-1].clone(), "labels": rows[:, 1:].clone(),
                   "loss_mask": torch.ones(mbs, s), "position_ids": torch.arange(s).expand(mbs, s).clone()}
        batch += 1


def build_data_iterators(args, tokenizer, consumed_train_samples, dp_rank, dp_size):
    train = _iterator(args, _stream(1), consumed_train_samples, dp_rank, dp_size)
    valid = _iterator(args, _stream(2), 0, dp_rank, dp_size)
    return train, valid


def install():
    module = types.ModuleType("mm_train.data")
    module.add_data_args, module.build_tokenizer = add_data_args, build_tokenizer
    module.build_data_iterators = build_data_iterators
    sys.modules["mm_train.data"] = module
