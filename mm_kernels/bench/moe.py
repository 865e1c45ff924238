"""MoE benchmark: index-form ``moe_permute`` and ``moe_unpermute`` (probs in the token dtype), forward and
permute + unpermute forward+backward. The reference is plain PyTorch: stable argsort + index_select,
then index_select + weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mm_kernels.bench.harness import BenchCase
from mm_kernels.ops.moe import moe_permute, moe_unpermute
from mm_kernels.reference import moe as reference

KERNEL = "moe"

# (T, H, E, K): a 16k-token micro-batch of a 2k-hidden model with 64 experts, top-4.
SHAPES = [(16384, 2048, 64, 4)]
QUICK_SHAPES = [(64, 128, 8, 2), (33, 100, 6, 3)]


def _ours_permute(tokens, indices):
    return moe_permute(tokens, indices)[0]


def _reference_permute(tokens, indices):
    return reference.permute_fwd(tokens, indices, indices.numel(), -1)[0]


def _ours_unpermute(permuted, sorted_indices, probs):
    return moe_unpermute(permuted, sorted_indices, probs)


def _reference_unpermute(permuted, sorted_indices, probs):
    return reference.unpermute_fwd(permuted, sorted_indices, probs, probs.shape[0])


def _ours_fwd_bwd(tokens, indices, probs, dout):
    permuted, sorted_indices = moe_permute(tokens, indices)
    out = moe_unpermute(permuted, sorted_indices, probs)
    return torch.autograd.grad(out, (tokens, probs), dout)


def _reference_fwd_bwd(tokens, indices, probs, dout):
    permuted, sorted_indices = reference.permute_fwd(tokens, indices, indices.numel(), -1)
    out = reference.unpermute_fwd(permuted, sorted_indices, probs, tokens.shape[0])
    return torch.autograd.grad(out, (tokens, probs), dout)


def _routing(num_tokens: int, num_experts: int, topk: int, device: torch.device) -> torch.Tensor:
    """indices [T, K]: K distinct random experts per token."""
    return torch.rand(num_tokens, num_experts, device=device).topk(topk, dim=1).indices


def cases(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool = False) -> list[BenchCase]:
    """permute, unpermute and fwd+bwd cases for each shape and dtype."""
    result = []
    for num_tokens, hidden, num_experts, topk in QUICK_SHAPES if quick else SHAPES:
        for dtype in dtypes:
            row = hidden * torch.tensor([], dtype=dtype).element_size()
            slots = num_tokens * topk
            shape = f"T={num_tokens} H={hidden} E={num_experts} K={topk}"

            def make_permute(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                return torch.randn(t, h, device=device, dtype=dtype), _routing(t, e, k, device)

            def make_unpermute(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                permuted, sorted_indices = moe_permute(*make_permute(t, h, e, k, dtype))
                return permuted, sorted_indices, torch.rand(t, k, device=device, dtype=dtype)

            def make_fwd_bwd(t=num_tokens, h=hidden, e=num_experts, k=topk, dtype=dtype):
                tokens = torch.randn(t, h, device=device, dtype=dtype, requires_grad=True)
                probs = torch.rand(t, k, device=device, dtype=dtype, requires_grad=True)
                return tokens, _routing(t, e, k, device), probs, torch.randn(t, h, device=device, dtype=dtype)

            # Least traffic: permute reads T rows, writes T*K; unpermute reads T*K, writes T. The backward
            # reads dout (T) and permuted (T*K), writes dpermuted (T*K), then reads it and writes dtokens (T).
            result.append(BenchCase(KERNEL, "permute", shape, dtype, make_permute, _ours_permute,
                                    _reference_permute, bytes_moved=(num_tokens + slots) * row))
            result.append(BenchCase(KERNEL, "unpermute", shape, dtype, make_unpermute, _ours_unpermute,
                                    _reference_unpermute, bytes_moved=(num_tokens + slots) * row))
            result.append(BenchCase(KERNEL, "fwd+bwd", shape, dtype, make_fwd_bwd, _ours_fwd_bwd,
                                    _reference_fwd_bwd, bytes_moved=(4 * num_tokens + 5 * slots) * row))
    return result
