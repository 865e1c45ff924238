"""MoE permute / unpermute on CPU: the C++ operators ``torch.ops.mm_kernels_cpu.moe_*``.

They take fp32, bf16 and fp16 tokens; fp64 tokens (used as a test oracle) run the reference.
Same functions and semantics as ``mm_kernels.reference.moe``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels._extension import cpu_extension
from mm_kernels.reference import moe as reference

cpu_extension()
_ops = torch.ops.mm_kernels_cpu


def _native(t: Tensor) -> bool:
    return t.dtype != torch.float64


def permute_fwd(tokens: Tensor, indices: Tensor, num_rows: int, num_experts: int) -> tuple[Tensor, Tensor]:
    if not _native(tokens):
        return reference.permute_fwd(tokens, indices, num_rows, num_experts)
    return _ops.moe_permute(tokens, indices, num_rows, num_experts)


def unpermute_fwd(permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None, num_tokens: int) -> Tensor:
    if not _native(permuted):
        return reference.unpermute_fwd(permuted, sorted_indices, probs, num_tokens)
    return _ops.moe_unpermute(permuted, sorted_indices, probs, num_tokens)


def unpermute_bwd(
    dout: Tensor, permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    if not _native(permuted):
        return reference.unpermute_bwd(dout, permuted, sorted_indices, probs)
    dpermuted, dprobs = _ops.moe_unpermute_bwd(dout, permuted, sorted_indices, probs)
    return dpermuted, None if probs is None else dprobs


def sort_routing_map(routing_map: Tensor, capacity: int) -> Tensor:
    return _ops.moe_sort_routing_map(routing_map, capacity)


def gather(src: Tensor, row_token: Tensor) -> Tensor:
    if not _native(src):
        return reference.gather(src, row_token)
    return _ops.moe_gather(src, row_token)


def combine(src: Tensor, row_token: Tensor, row_weight: Tensor | None, num_tokens: int) -> Tensor:
    if not _native(src):
        return reference.combine(src, row_token, row_weight, num_tokens)
    return _ops.moe_combine(src, row_token, row_weight, num_tokens)


def combine_bwd(
    dout: Tensor, src: Tensor, row_token: Tensor, row_weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    if not _native(src):
        return reference.combine_bwd(dout, src, row_token, row_weight)
    dsrc, dweight = _ops.moe_combine_bwd(dout, src, row_token, row_weight)
    return dsrc, None if row_weight is None else dweight
