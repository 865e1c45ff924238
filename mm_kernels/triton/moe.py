"""MoE permute / unpermute as Triton kernels; index building (sorts, searches) with torch ops.

The kernels of :class:`mm_kernels.contract.MoE` (semantics in ``mm_kernels.reference.moe``). None waits
for the device (no host sync: they can be captured in a CUDA graph) except ``sort_routing_map`` without
a capacity, whose output size is the number of routed pairs. Rows are moved in blocks of BLOCK_H
columns and summed in fp32; each output element is written by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mm_kernels.reference.moe import expert_order, sort_routing_map, topk_of

__all__ = ["combine", "combine_bwd", "gather", "permute_fwd", "sort_routing_map", "unpermute_bwd", "unpermute_fwd"]

BLOCK_H = 1024


def _block(hidden: int) -> int:
    return min(BLOCK_H, triton.next_power_of_2(max(hidden, 1)))


@triton.jit
def _gather_kernel(src_ptr, row_token_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    token = tl.load(row_token_ptr + row).to(tl.int64)
    values = tl.load(src_ptr + token * hidden + cols, mask=mask)
    tl.store(out_ptr + row * hidden + cols, values, mask=mask)


@triton.jit
def _sum_rows_kernel(src_ptr, entry_row_ptr, first_ptr, entry_weight_ptr, out_ptr, rows, hidden,
                     HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over entries j in [first[t], first[t + 1]) of src[entry_row[j]] * entry_weight[j]; rows >= rows skipped."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(tl.load(first_ptr + token), tl.load(first_ptr + token + 1)):
        row = tl.load(entry_row_ptr + j).to(tl.int64)
        kept = mask & (tl.zeros([BLOCK], dtype=tl.int64) + row < rows)
        values = tl.load(src_ptr + row * hidden + cols, mask=kept, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            values = values * tl.load(entry_weight_ptr + j).to(tl.float32)
        acc += values
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_dot_kernel(dout_ptr, src_ptr, pair_row_ptr, pair_token_ptr, weight_ptr, dsrc_ptr, dweight_ptr, rows,
                      hidden, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """For pair i (row, token) with row < rows: dsrc[row] = dout[token] * weight[i], dweight[i] = <src[row], dout[token]>."""
    pair = tl.program_id(0).to(tl.int64)
    row = tl.load(pair_row_ptr + pair).to(tl.int64)
    token = tl.load(pair_token_ptr + pair).to(tl.int64)
    weight = tl.load(weight_ptr + pair).to(tl.float32) if HAS_WEIGHT else 1.0
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = (cols < hidden) & (tl.zeros([BLOCK], dtype=tl.int64) + row < rows)
        grad = tl.load(dout_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dsrc_ptr + row * hidden + cols, (grad * weight).to(dsrc_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dot += grad * tl.load(src_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + pair, tl.sum(dot, axis=0))


def _sum_rows(src: Tensor, entry_row: Tensor, first: Tensor, entry_weight: Tensor | None, num_tokens: int) -> Tensor:
    src = src.contiguous()
    hidden = src.shape[1]
    out = src.new_empty(num_tokens, hidden)
    if num_tokens and hidden:
        block = _block(hidden)
        _sum_rows_kernel[(num_tokens, triton.cdiv(hidden, block))](
            src, entry_row.contiguous(), first, src if entry_weight is None else entry_weight.contiguous(), out,
            src.shape[0], hidden, HAS_WEIGHT=entry_weight is not None, BLOCK=block)
    return out


def _scale_dot(dout: Tensor, src: Tensor, pair_row: Tensor, pair_token: Tensor,
               weight: Tensor | None) -> tuple[Tensor, Tensor | None]:
    src = src.contiguous()
    hidden = src.shape[1]
    dsrc = torch.empty_like(src)
    dweight = src.new_zeros(pair_row.numel(), dtype=torch.float32)
    if pair_row.numel() and hidden:
        _scale_dot_kernel[(pair_row.numel(),)](
            dout.contiguous(), src, pair_row.contiguous(), pair_token, src if weight is None else weight.contiguous(),
            dsrc, dweight, src.shape[0], hidden, HAS_WEIGHT=weight is not None, BLOCK=_block(hidden))
    return dsrc, None if weight is None else dweight


def gather(src: Tensor, row_token: Tensor) -> Tensor:
    src = src.contiguous()
    rows, hidden = row_token.shape[0], src.shape[1]
    out = src.new_empty(rows, hidden)
    if rows and hidden:
        block = _block(hidden)
        _gather_kernel[(rows, triton.cdiv(hidden, block))](src, row_token.contiguous(), out, hidden, BLOCK=block)
    return out


def permute_fwd(tokens: Tensor, indices: Tensor, num_rows: int, num_experts: int) -> tuple[Tensor, Tensor]:
    del num_experts
    sorted_indices, row_token = expert_order(indices, num_rows)
    return gather(tokens, row_token), sorted_indices


def unpermute_fwd(permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None, num_tokens: int) -> Tensor:
    topk = topk_of(sorted_indices, num_tokens)
    first = torch.arange(num_tokens + 1, device=permuted.device) * topk
    return _sum_rows(permuted, sorted_indices, first, None if probs is None else probs.reshape(-1), num_tokens)


def unpermute_bwd(
    dout: Tensor, permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    topk = topk_of(sorted_indices, dout.shape[0])
    slot_token = torch.arange(sorted_indices.numel(), device=permuted.device) // max(topk, 1)
    weight = None if probs is None else probs.reshape(-1)
    dpermuted, dprobs = _scale_dot(dout, permuted, sorted_indices, slot_token, weight)
    return dpermuted, None if probs is None else dprobs.view(probs.shape).to(probs.dtype)


def combine(src: Tensor, row_token: Tensor, row_weight: Tensor | None, num_tokens: int) -> Tensor:
    order = torch.argsort(row_token, stable=True)
    # first[t]: where token t's rows start in that order (searchsorted, not bincount: no host sync).
    tokens = torch.arange(num_tokens + 1, device=row_token.device, dtype=row_token.dtype)
    first = torch.searchsorted(row_token.index_select(0, order), tokens)
    return _sum_rows(src, order, first, None if row_weight is None else row_weight.index_select(0, order), num_tokens)


def combine_bwd(
    dout: Tensor, src: Tensor, row_token: Tensor, row_weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    rows = torch.arange(src.shape[0], device=src.device)
    dsrc, dweight = _scale_dot(dout, src, rows, row_token.contiguous(), row_weight)
    return dsrc, None if row_weight is None else dweight.to(row_weight.dtype)
