"""MoE permute / unpermute as Triton kernels; index building (sorts, counts) with torch ops.

Same functions and semantics as ``mm_kernels.reference.moe``. Rows are moved in blocks of
BLOCK_H columns and summed in fp32; each output element is written by one program.
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
def _unpermute_kernel(permuted_ptr, sorted_ptr, probs_ptr, out_ptr, rows, hidden, topk,
                      HAS_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(topk):
        slot = token * topk + k
        row = tl.load(sorted_ptr + slot).to(tl.int64)
        kept = mask & (tl.zeros([BLOCK], dtype=tl.int64) + row < rows)
        values = tl.load(permuted_ptr + row * hidden + cols, mask=kept, other=0.0).to(tl.float32)
        if HAS_PROBS:
            values = values * tl.load(probs_ptr + slot).to(tl.float32)
        acc += values
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd_kernel(dout_ptr, permuted_ptr, sorted_ptr, probs_ptr, dpermuted_ptr, dprobs_ptr, rows, hidden,
                          topk, HAS_PROBS: tl.constexpr, BLOCK: tl.constexpr):
    slot = tl.program_id(0).to(tl.int64)
    token = slot // topk
    row = tl.load(sorted_ptr + slot).to(tl.int64)
    weight = tl.load(probs_ptr + slot).to(tl.float32) if HAS_PROBS else 1.0
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = (cols < hidden) & (tl.zeros([BLOCK], dtype=tl.int64) + row < rows)
        grad = tl.load(dout_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dpermuted_ptr + row * hidden + cols, (grad * weight).to(dpermuted_ptr.dtype.element_ty), mask=mask)
        if HAS_PROBS:
            dot += grad * tl.load(permuted_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_PROBS:
        tl.store(dprobs_ptr + slot, tl.sum(dot, axis=0))


@triton.jit
def _combine_kernel(src_ptr, order_ptr, first_ptr, weight_ptr, out_ptr, hidden,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(tl.load(first_ptr + token), tl.load(first_ptr + token + 1)):
        row = tl.load(order_ptr + j).to(tl.int64)
        values = tl.load(src_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            values = values * tl.load(weight_ptr + row).to(tl.float32)
        acc += values
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(dout_ptr, src_ptr, row_token_ptr, weight_ptr, dsrc_ptr, dweight_ptr, hidden,
                        HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(row_token_ptr + row).to(tl.int64)
    weight = tl.load(weight_ptr + row).to(tl.float32) if HAS_WEIGHT else 1.0
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < hidden
        grad = tl.load(dout_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dsrc_ptr + row * hidden + cols, (grad * weight).to(dsrc_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dot += grad * tl.load(src_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + row, tl.sum(dot, axis=0))


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
    permuted = permuted.contiguous()
    hidden = permuted.shape[1]
    out = permuted.new_empty(num_tokens, hidden)
    if num_tokens and hidden:
        block = _block(hidden)
        probs_arg = sorted_indices if probs is None else probs.contiguous()
        _unpermute_kernel[(num_tokens, triton.cdiv(hidden, block))](
            permuted, sorted_indices.contiguous(), probs_arg, out, permuted.shape[0], hidden,
            topk_of(sorted_indices, num_tokens), HAS_PROBS=probs is not None, BLOCK=block)
    return out


def unpermute_bwd(
    dout: Tensor, permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    permuted = permuted.contiguous()
    dpermuted = torch.empty_like(permuted)
    dprobs = permuted.new_zeros(sorted_indices.numel(), dtype=torch.float32)
    slots, hidden = sorted_indices.numel(), permuted.shape[1]
    if slots and hidden:
        _unpermute_bwd_kernel[(slots,)](
            dout.contiguous(), permuted, sorted_indices.contiguous(),
            sorted_indices if probs is None else probs.contiguous(), dpermuted, dprobs, permuted.shape[0], hidden,
            topk_of(sorted_indices, dout.shape[0]), HAS_PROBS=probs is not None, BLOCK=_block(hidden))
    return dpermuted, None if probs is None else dprobs.view(probs.shape).to(probs.dtype)


def combine(src: Tensor, row_token: Tensor, row_weight: Tensor | None, num_tokens: int) -> Tensor:
    src = src.contiguous()
    hidden = src.shape[1]
    out = src.new_empty(num_tokens, hidden)
    if num_tokens and hidden:
        order = torch.argsort(row_token, stable=True)
        counts = torch.bincount(row_token, minlength=num_tokens)
        first = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        block = _block(hidden)
        _combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
            src, order, first, src if row_weight is None else row_weight.contiguous(), out, hidden,
            HAS_WEIGHT=row_weight is not None, BLOCK=block)
    return out


def combine_bwd(
    dout: Tensor, src: Tensor, row_token: Tensor, row_weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    src = src.contiguous()
    rows, hidden = src.shape
    dsrc = torch.empty_like(src)
    dweight = src.new_zeros(rows, dtype=torch.float32)
    if rows and hidden:
        _combine_bwd_kernel[(rows,)](
            dout.contiguous(), src, row_token.contiguous(), src if row_weight is None else row_weight.contiguous(),
            dsrc, dweight, hidden, HAS_WEIGHT=row_weight is not None, BLOCK=_block(hidden))
    return dsrc, None if row_weight is None else dweight.to(row_weight.dtype)
