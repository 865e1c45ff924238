"""MoE benchmark: index-form ``moe_permute`` and ``moe_unpermute`` forward (probs in the token dtype), and
permute + unpermute bwd and fwd+bwd. The eager baseline is plain PyTorch: stable argsort + index_select,
then index_select + weighted sum. The few-token shape measures the per-call overhead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mm_kernels.bench.harness import BenchCase, timings
from mm_kernels.ops.moe import moe_permute, moe_unpermute
from mm_kernels.reference import moe as reference

KERNEL = "moe"

# (T, H, E, K): a 16k-token micro-batch of a 2k-hidden model with 64 experts, top-4; a decode step of 8 tokens.
SHAPES = [(16384, 2048, 64, 4), (8, 2048, 64, 4)]
QUICK_SHAPES = [(64, 128, 8, 2), (33, 100, 6, 3)]


def _ours_permute(tokens, indices):
    return moe_permute(tokens, indices)[0]


def _eager_permute(tokens, indices):
    return reference.permute_fwd(tokens, indices, indices.numel(), -1)[0]


def _ours_unpermute(permuted, sorted_indices, probs):
    return moe_unpermute(permuted, sorted_indices, probs)


def _eager_unpermute(permuted, sorted_indices, probs):
    return reference.unpermute_fwd(permuted, sorted_indices, probs, probs.shape[0])


def _ours_round_trip(tokens, indices, probs):
    return moe_unpermute(*moe_permute(tokens, indices), probs)


def _eager_round_trip(tokens, indices, probs):
    permuted, sorted_indices = reference.permute_fwd(tokens, indices, indices.numel(), -1)
    return reference.unpermute_fwd(permuted, sorted_indices, probs, tokens.shape[0])


def _routing(num_tokens: int, num_experts: int, topk: int, device: torch.device) -> torch.Tensor:
    """indices [T, K]: K distinct random experts per token."""
    return torch.rand(num_tokens, num_experts, device=device).topk(topk, dim=1).indices


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> list[BenchCase]:
    """permute and unpermute forward, and the round trip's bwd and fwd+bwd, for each shape and dtype.

    Least traffic in rows of H: permute reads T, writes T*K; unpermute reads T*K, writes T. The backward
    reads dout (T) and permuted (T*K), writes dpermuted (T*K), then reads it and writes dtokens (T).
    """
    result = []
    for num_tokens, hidden, num_experts, topk in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            row = hidden * dtype.itemsize
            slots = num_tokens * topk
            shape = f"T={num_tokens} H={hidden} E={num_experts} K={topk}"

            def make_permute(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                return torch.randn(t, h, device=device, dtype=dtype), _routing(t, e, k, device)

            def make_unpermute(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                permuted, sorted_indices = moe_permute(*make_permute(t, h, e, k, dtype))
                return permuted, sorted_indices, torch.rand(t, k, device=device, dtype=dtype)

            def make_round_trip(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                tokens = torch.randn(t, h, device=device, dtype=dtype, requires_grad=True)
                probs = torch.rand(t, k, device=device, dtype=dtype, requires_grad=True)
                return tokens, _routing(t, e, k, device), probs

            result.append(BenchCase(KERNEL, "fwd", shape, dtype, make_permute, _ours_permute, _eager_permute,
                                    bytes_moved=(num_tokens + slots) * row, mode="permute"))
            result.append(BenchCase(KERNEL, "fwd", shape, dtype, make_unpermute, _ours_unpermute, _eager_unpermute,
                                    bytes_moved=(num_tokens + slots) * row, mode="unpermute"))
            traffic = {"bwd": 2 * num_tokens + 3 * slots, "fwd+bwd": 4 * num_tokens + 5 * slots}
            for timing in timings(device)[1:]:
                result.append(BenchCase(KERNEL, timing, shape, dtype, make_round_trip, _ours_round_trip,
                                        _eager_round_trip, bytes_moved=traffic[timing] * row, grad_of=(0, 2)))
    return result
