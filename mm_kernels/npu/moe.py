"""MoE permute / unpermute on Ascend NPUs: torch_npu's fused index-form operators.

``permute_fwd`` and ``unpermute_fwd`` call torch_npu.npu_moe_token_permute /
npu_moe_token_unpermute (the permute backward is an unpermute without probs); the other
functions are the reference PyTorch ones, which run on NPU tensors as they are.
"""

from __future__ import annotations

import torch_npu
from torch import Tensor

from mm_kernels.reference.moe import combine, combine_bwd, gather, sort_routing_map, topk_of, unpermute_bwd

__all__ = ["combine", "combine_bwd", "gather", "permute_fwd", "sort_routing_map", "unpermute_bwd", "unpermute_fwd"]


def permute_fwd(tokens: Tensor, indices: Tensor, num_rows: int, num_experts: int) -> tuple[Tensor, Tensor]:
    del num_experts
    return torch_npu.npu_moe_token_permute(tokens, indices, num_out_tokens=num_rows)


def unpermute_fwd(permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None, num_tokens: int) -> Tensor:
    if probs is None:
        # torch_npu takes K = 1 without probs; unit weights keep K = T * K / T.
        probs = permuted.new_ones(num_tokens, topk_of(sorted_indices, num_tokens))
    return torch_npu.npu_moe_token_unpermute(
        permuted, sorted_indices, probs, restore_shape=(num_tokens, permuted.shape[1])
    )
