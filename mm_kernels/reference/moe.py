"""MoE token permute / unpermute in plain PyTorch (argsort, index_select, weighted sum): the oracle.

Index form (slot s = t * K + k of ``indices [T, K]``): ``sorted_indices[s]`` is the output row of
slot s, expert-major and ascending slot within an expert; rows >= ``num_rows`` are dropped.
Row form (Megatron's routing map): row r of the permuted tensor holds token ``row_token[r]``.
Each backend module (``mm_kernels.<backend>.moe``) defines the functions below with these semantics;
``permute_fwd`` and ``unpermute_fwd`` here are also differentiable with torch autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype


def num_kept_rows(slots: int, num_out_tokens: int) -> int:
    """Rows kept out of ``slots``: ``num_out_tokens`` if > 0, else ``slots + num_out_tokens``, within [0, slots]."""
    kept = num_out_tokens if num_out_tokens > 0 else slots + num_out_tokens
    return min(max(kept, 0), slots)


def topk_of(sorted_indices: Tensor, num_tokens: int) -> int:
    """Slots per token of ``sorted_indices [T * K]`` for T = ``num_tokens`` (0 when there are no tokens)."""
    return sorted_indices.numel() // num_tokens if num_tokens > 0 else 0


def expert_order(indices: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """indices [T, K] int -> (sorted_indices [T * K] int32, row_token [num_rows] int64), by stable argsort."""
    order = torch.argsort(indices.reshape(-1), stable=True)
    sorted_indices = torch.argsort(order).to(torch.int32)
    return sorted_indices, order[:num_rows] // max(indices.shape[1], 1)


def permute_fwd(tokens: Tensor, indices: Tensor, num_rows: int, num_experts: int) -> tuple[Tensor, Tensor]:
    """tokens [T, H], indices [T, K] int -> (permuted [num_rows, H], sorted_indices [T * K] int32).

    ``num_experts`` (-1: unknown) only bounds the indices, checked by the caller.
    """
    del num_experts
    sorted_indices, row_token = expert_order(indices, num_rows)
    return tokens.index_select(0, row_token), sorted_indices


def unpermute_fwd(permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None, num_tokens: int) -> Tensor:
    """permuted [N, H], sorted_indices [T * K], probs [T, K] or None -> out [T, H] in permuted.dtype.

    out[t] = sum_k permuted[sorted_indices[t * K + k]] * probs[t, k]; slots with a row >= N add nothing.
    The products and the sum are computed in fp32 (fp64 for fp64 inputs).
    """
    rows, hidden = permuted.shape
    topk = topk_of(sorted_indices, num_tokens)
    slot_rows = sorted_indices.long().view(num_tokens, topk)
    if rows < sorted_indices.numel():
        # Dropped slots read an appended zero row.
        permuted = torch.cat([permuted, permuted.new_zeros(1, hidden)])
        slot_rows = slot_rows.clamp(max=rows)
    acc = compute_dtype(permuted.dtype)
    gathered = permuted.index_select(0, slot_rows.reshape(-1)).view(num_tokens, topk, hidden).to(acc)
    if probs is not None:
        gathered = gathered * probs.reshape(num_tokens, topk).unsqueeze(-1).to(acc)
    return gathered.sum(dim=1).to(permuted.dtype)


def unpermute_bwd(
    dout: Tensor, permuted: Tensor, sorted_indices: Tensor, probs: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`unpermute_fwd`: (dpermuted like permuted, dprobs like probs or None), in fp32.

    Gathers only (the slot of each kept row comes from inverting the permutation), so the result does
    not depend on scatter order and nothing waits for the device.
    """
    rows, hidden = permuted.shape
    slots = sorted_indices.numel()
    topk = max(topk_of(sorted_indices, dout.shape[0]), 1)
    slot_rows = sorted_indices.long()
    all_slots = torch.arange(slots, device=permuted.device)
    slot_of_row = torch.empty_like(slot_rows).scatter_(0, slot_rows, all_slots)[:rows]
    dpermuted = dout.float().index_select(0, slot_of_row // topk)
    if probs is None:
        return dpermuted.to(permuted.dtype), None
    weights = probs.reshape(-1).float()
    dpermuted = dpermuted * weights.index_select(0, slot_of_row).unsqueeze(-1)
    # Dropped slots (row >= N) read an appended zero row.
    padded = torch.cat([permuted.float(), permuted.new_zeros(1, hidden, dtype=torch.float32)])
    kept_rows = torch.where(slot_rows < rows, slot_rows, rows)
    dots = (padded.index_select(0, kept_rows) * dout.float().index_select(0, all_slots // topk)).sum(dim=-1)
    return dpermuted.to(permuted.dtype), dots.view(probs.shape).to(probs.dtype)


def sort_routing_map(routing_map: Tensor, capacity: int) -> Tensor:
    """routing_map [T, E] bool -> row_slot [N] int64, row_slot[r] = t * E + e of row r.

    Expert-major, ascending token within an expert. capacity < 0 keeps every routed (t, e);
    capacity >= 0 gives each expert min(capacity, T) rows: its routed tokens, then unrouted ones.
    """
    num_tokens, num_experts = routing_map.shape
    by_expert = routing_map.t()
    if capacity < 0:
        expert, token = torch.nonzero(by_expert, as_tuple=True)
    else:
        keep = min(capacity, num_tokens)
        token = torch.argsort((~by_expert).to(torch.int8), dim=1, stable=True)[:, :keep].reshape(-1)
        expert = torch.arange(num_experts, device=routing_map.device).repeat_interleave(keep)
    return token * num_experts + expert


def gather(src: Tensor, row_token: Tensor) -> Tensor:
    """src [T, H], row_token [N] int -> out [N, H], out[r] = src[row_token[r]]."""
    return src.index_select(0, row_token.long())


def combine(src: Tensor, row_token: Tensor, row_weight: Tensor | None, num_tokens: int) -> Tensor:
    """src [N, H], row_token [N], row_weight [N] or None -> out [num_tokens, H] in src.dtype.

    out[t] = sum of src[r] * row_weight[r] over the rows r of token t, summed in fp32.
    """
    rows = src.float() if row_weight is None else src.float() * row_weight.float().unsqueeze(-1)
    out = torch.zeros(num_tokens, src.shape[1], dtype=torch.float32, device=src.device)
    return out.index_add_(0, row_token.long(), rows).to(src.dtype)


def combine_bwd(
    dout: Tensor, src: Tensor, row_token: Tensor, row_weight: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Gradients of :func:`combine`: (dsrc like src, drow_weight like row_weight or None)."""
    dout_rows = dout.float().index_select(0, row_token.long())
    if row_weight is None:
        return dout_rows.to(src.dtype), None
    dsrc = dout_rows * row_weight.float().unsqueeze(-1)
    return dsrc.to(src.dtype), (src.float() * dout_rows).sum(dim=-1).to(row_weight.dtype)
