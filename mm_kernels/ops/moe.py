"""MoE token permute / unpermute: public API and the ``mm_kernels::moe_*`` operators.

Two forms (semantics in ``mm_kernels.reference.moe``):
- index form, like torch_npu.npu_moe_token_permute / npu_moe_token_unpermute:
  :func:`moe_permute` and :func:`moe_unpermute`;
- routing-map form with the signatures and return values of Megatron-core's
  ``moe_utils.permute`` / ``moe_utils.unpermute``: :func:`moe_permute_with_routing_map` and
  :func:`moe_unpermute_with_routing_map` (also named :data:`megatron_permute` / :data:`megatron_unpermute`).
Values that need the data (expert ids, row indices) are checked when the op runs, before any
output is written (on an accelerator as device assertions, without a host sync); shapes and dtypes
are checked before the op is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mm_kernels import contract
from mm_kernels.dispatch import host_checks
from mm_kernels.ops._checks import check_float, check_index, check_same_device, check_shape
from mm_kernels.ops._kernel_op import KernelOp
from mm_kernels.reference.moe import num_kept_rows

_NOT_A_PERMUTATION = ("sorted_indices must be a permutation of [0, T*K) (a row appears twice); "
                      "pass the sorted_indices returned by moe_permute")


def _on_host(t: Tensor) -> bool:
    """Whether checks of ``t``'s values run on the host: CPU tensors, or any with ``MM_KERNELS_DEBUG=1``."""
    return t.device.type == "cpu" or host_checks()


def _require(ok: Tensor, message: str) -> None:
    """Raises ValueError(message) unless the 0-d bool ``ok`` is true; on an accelerator the check is an
    asynchronous device assertion (no host sync, capturable in a CUDA graph) unless MM_KERNELS_DEBUG=1."""
    if _on_host(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def _check_values_in(name: str, values: Tensor, bound: int) -> None:
    """Raises ValueError unless every element of ``values`` is in [0, bound) (bound < 0: no upper bound).

    On the host the message names the offending value; on an accelerator it is a device assertion.
    """
    if values.numel() == 0:
        return
    if not _on_host(values):
        ok = values >= 0 if bound < 0 else (values >= 0) & (values < bound)
        _require(ok.all(), f"{name} must be in [0, {bound if bound >= 0 else 'inf'})")
        return
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise ValueError(f"{name} must be >= 0, got {low}")
    if bound >= 0 and high >= bound:
        raise ValueError(f"{name} must be < {bound}, got {high}")


def _check_permute(tokens, indices, num_rows, num_experts):
    _check_values_in("indices (expert ids)" if num_experts < 0 else f"indices (num_experts = {num_experts})",
                     indices, num_experts)


def _check_unpermute(permuted, sorted_indices, probs, num_tokens):
    slots = sorted_indices.numel()
    _check_values_in("sorted_indices", sorted_indices, slots)
    rows = sorted_indices.long().clamp(0, max(slots - 1, 0))
    hit = torch.zeros(slots, dtype=torch.bool, device=sorted_indices.device).index_fill_(0, rows, True)
    _require(hit.all(), _NOT_A_PERMUTATION)


def _check_gather(src, row_token):
    _check_values_in("sorted_indices (token rows)", row_token, src.shape[0])


def _check_combine(src, row_token, row_weight, num_tokens):
    _check_values_in("sorted_indices (token rows)", row_token, num_tokens)


moe_permute_fwd = KernelOp(contract.MoE, "permute_fwd", before=_check_permute)
moe_unpermute_fwd = KernelOp(contract.MoE, "unpermute_fwd", before=_check_unpermute)
moe_unpermute_bwd = KernelOp(contract.MoE, "unpermute_bwd")
moe_sort_routing_map = KernelOp(contract.MoE, "sort_routing_map")
moe_gather = KernelOp(contract.MoE, "gather", before=_check_gather)
moe_combine = KernelOp(contract.MoE, "combine", before=_check_combine)
moe_combine_bwd = KernelOp(contract.MoE, "combine_bwd")


# ---- index form ---------------------------------------------------------------------------


@moe_permute_fwd.register_fake
def _(tokens, indices, num_rows, num_experts):
    return tokens.new_empty(num_rows, tokens.shape[1]), indices.new_empty(indices.numel(), dtype=torch.int32)


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.num_tokens = inputs[0].shape[0]


def _permute_backward(ctx, dpermuted, dsorted):
    (sorted_indices,) = ctx.saved_tensors
    dtokens = moe_unpermute_fwd.run(ctx.backend, dpermuted.contiguous(), sorted_indices, None, ctx.num_tokens)
    return dtokens, None, None, None


moe_permute_fwd.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@moe_unpermute_fwd.register_fake
def _(permuted, sorted_indices, probs, num_tokens):
    return permuted.new_empty(num_tokens, permuted.shape[1])


@moe_unpermute_bwd.register_fake
def _(dout, permuted, sorted_indices, probs):
    return torch.empty_like(permuted, memory_format=torch.contiguous_format), (
        permuted.new_empty(0) if probs is None else torch.empty_like(probs, memory_format=torch.contiguous_format)
    )


def _unpermute_setup_context(ctx, inputs, output):
    permuted, sorted_indices, probs, _ = inputs
    ctx.save_for_backward(permuted, sorted_indices, probs)


def _unpermute_backward(ctx, dout):
    permuted, sorted_indices, probs = ctx.saved_tensors
    dpermuted, dprobs = moe_unpermute_bwd.run(ctx.backend, dout.contiguous(), permuted, sorted_indices, probs)
    return dpermuted, None, (dprobs if probs is not None else None), None


moe_unpermute_fwd.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


def moe_permute(
    tokens: Tensor, indices: Tensor, num_out_tokens: int = 0, num_experts: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Groups token copies by expert (torch_npu.npu_moe_token_permute semantics).

    tokens [T, H] fp32/fp16/bf16/fp64, indices [T, K] or [T] int32/int64 expert ids ->
    (permuted [N, H] in tokens.dtype, sorted_indices [T * K] int32). Slot s = t * K + k goes to
    row sorted_indices[s]: expert-major, ascending token within an expert. N = num_out_tokens
    if > 0, else T * K + num_out_tokens (0 keeps every slot, -T * K none); rows past N are dropped.
    ``num_experts``, when given, bounds the expert ids. Differentiable in tokens.
    """
    check_float("tokens", tokens)
    check_shape("tokens", tokens, 2, "[T, H]")
    check_index("indices", indices)
    if indices.dim() not in (1, 2) or indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"indices must have shape [T, K] or [T] with T = {tokens.shape[0]} (the rows of tokens), "
                         f"got {tuple(indices.shape)}")
    check_same_device(tokens=tokens, indices=indices)
    if num_experts is not None and num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    slots, num_out_tokens = indices.numel(), int(num_out_tokens)
    if num_out_tokens < -slots:
        raise ValueError(f"num_out_tokens must be >= -T*K = {-slots} (T*K + num_out_tokens rows are kept), "
                         f"got {num_out_tokens}")
    if indices.dim() == 1:
        indices = indices.unsqueeze(-1)
    return moe_permute_fwd(tokens, indices, num_kept_rows(slots, num_out_tokens),
                           -1 if num_experts is None else int(num_experts))


def moe_unpermute(
    permuted: Tensor,
    sorted_indices: Tensor,
    probs: Optional[Tensor] = None,
    restore_shape: Optional[Sequence[int]] = None,
) -> Tensor:
    """Sums each token's expert rows back into token order (torch_npu.npu_moe_token_unpermute semantics).

    permuted [N, H], sorted_indices [T * K] int32/int64 from :func:`moe_permute`, probs [T, K] or None ->
    out [T, H] in permuted.dtype, out[t] = sum_k permuted[sorted_indices[t * K + k]] * probs[t, k],
    accumulated in fp32; a dropped slot (row >= N) adds nothing. T comes from probs, else from
    ``restore_shape`` (T, H), else K = 1. Differentiable in permuted and probs.
    """
    check_float("permuted", permuted)
    check_shape("permuted", permuted, 2, "[N, H]")
    check_index("sorted_indices", sorted_indices)
    check_shape("sorted_indices", sorted_indices, 1, "[T * K]")
    slots = sorted_indices.shape[0]
    if probs is not None:
        check_float("probs", probs)
        check_shape("probs", probs, 2, "[T, K]")
        if probs.numel() != slots:
            raise ValueError(f"probs must have shape [T, K] with T * K = {slots} (the length of sorted_indices), "
                             f"got {tuple(probs.shape)}")
    num_tokens = probs.shape[0] if probs is not None else slots
    if restore_shape is not None:
        restore = tuple(int(d) for d in restore_shape)
        if len(restore) != 2 or restore[1] != permuted.shape[1] or (probs is not None and restore[0] != num_tokens):
            raise ValueError(f"restore_shape must be (T, H) = ({num_tokens if probs is not None else 'T'}, "
                             f"{permuted.shape[1]}), got {restore}")
        num_tokens = restore[0]
    if (num_tokens == 0 and slots != 0) or (num_tokens != 0 and slots % num_tokens != 0):
        raise ValueError(f"sorted_indices has {slots} slots, not a multiple of T = {num_tokens} tokens")
    if permuted.shape[0] > slots:
        raise ValueError(f"permuted has {permuted.shape[0]} rows, more than the {slots} slots of sorted_indices")
    check_same_device(permuted=permuted, sorted_indices=sorted_indices, probs=probs)
    return moe_unpermute_fwd(permuted, sorted_indices, probs, num_tokens)


# ---- routing-map form (row form) ----------------------------------------------------------


@moe_sort_routing_map.register_fake
def _(routing_map, capacity):
    num_tokens, num_experts = routing_map.shape
    rows = torch.library.get_ctx().new_dynamic_size() if capacity < 0 else num_experts * min(capacity, num_tokens)
    return routing_map.new_empty(rows, dtype=torch.int64)


@moe_gather.register_fake
def _(src, row_token):
    return src.new_empty(row_token.shape[0], src.shape[1])


def _gather_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.num_tokens = inputs[0].shape[0]


def _gather_backward(ctx, dout):
    (row_token,) = ctx.saved_tensors
    return moe_combine.run(ctx.backend, dout.contiguous(), row_token, None, ctx.num_tokens), None


moe_gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@moe_combine.register_fake
def _(src, row_token, row_weight, num_tokens):
    return src.new_empty(num_tokens, src.shape[1])


@moe_combine_bwd.register_fake
def _(dout, src, row_token, row_weight):
    return torch.empty_like(src, memory_format=torch.contiguous_format), (
        src.new_empty(0) if row_weight is None else torch.empty_like(row_weight, memory_format=torch.contiguous_format)
    )


def _combine_setup_context(ctx, inputs, output):
    src, row_token, row_weight, _ = inputs
    ctx.save_for_backward(src, row_token, row_weight)


def _combine_backward(ctx, dout):
    src, row_token, row_weight = ctx.saved_tensors
    dsrc, dweight = moe_combine_bwd.run(ctx.backend, dout.contiguous(), src, row_token, row_weight)
    return dsrc, None, (dweight if row_weight is not None else None), None


moe_combine.register_autograd(_combine_backward, setup_context=_combine_setup_context)


def _check_routing_map(routing_map: object, num_tokens: int) -> Tensor:
    if not isinstance(routing_map, Tensor) or routing_map.is_floating_point() or routing_map.is_complex():
        kind = routing_map.dtype if isinstance(routing_map, Tensor) else type(routing_map).__name__
        raise TypeError(f"routing_map must be a bool (or integer) tensor [T, E], got {kind}")
    if routing_map.dim() != 2 or routing_map.shape[0] != num_tokens or routing_map.shape[1] < 1:
        raise ValueError(f"routing_map must have shape [T, E] with T = {num_tokens} and E >= 1, "
                         f"got {tuple(routing_map.shape)}")
    return routing_map if routing_map.dtype == torch.bool else routing_map != 0


def _check_probs_like_map(probs: Tensor, routing_map: Tensor) -> None:
    check_float("probs", probs)
    if probs.shape != routing_map.shape:
        raise ValueError(f"probs must have the shape of routing_map [T, E] = {tuple(routing_map.shape)}, "
                         f"got {tuple(probs.shape)}")


def moe_permute_with_routing_map(
    tokens: Tensor,
    routing_map: Tensor,
    probs: Optional[Tensor] = None,
    num_out_tokens: Optional[int] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Megatron-core ``moe_utils.permute``: groups token copies by expert from a routing map.

    tokens [T, H], routing_map [T, E] bool, probs [T, E] or None ->
    (permuted [N, H], permuted_probs [N] in probs.dtype or None, sorted_indices [N] int64 token of each row).
    Rows are expert-major, ascending token within an expert; N = routing_map.sum().
    With ``drop_and_pad`` and ``num_out_tokens``, each expert gets capacity = num_out_tokens // E rows
    (at most T): its routed tokens, then unrouted ones as padding. ``fused`` is accepted and ignored.
    Differentiable in tokens and probs.
    """
    del fused
    check_float("tokens", tokens)
    check_shape("tokens", tokens, 2, "[T, H]")
    routing_map = _check_routing_map(routing_map, tokens.shape[0])
    if probs is not None:
        _check_probs_like_map(probs, routing_map)
    check_same_device(tokens=tokens, routing_map=routing_map, probs=probs)
    num_experts = routing_map.shape[1]
    capacity = int(num_out_tokens) // num_experts if drop_and_pad and num_out_tokens is not None else -1
    row_slot = moe_sort_routing_map(routing_map, capacity)
    sorted_indices = torch.div(row_slot, num_experts, rounding_mode="floor")
    permuted = moe_gather(tokens, sorted_indices)
    permuted_probs = None if probs is None else probs.reshape(-1).index_select(0, row_slot)
    return permuted, permuted_probs, sorted_indices


def moe_unpermute_with_routing_map(
    permuted_tokens: Tensor,
    sorted_indices: Tensor,
    restore_shape: Sequence[int],
    probs: Optional[Tensor] = None,
    routing_map: Optional[Tensor] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> Tensor:
    """Megatron-core ``moe_utils.unpermute``: sums expert rows back into token order.

    permuted_tokens [N, H], sorted_indices [N] int (token of each row), restore_shape (T, H),
    probs [T, E] or None (then routing_map [T, E] is required) -> out [T, H] in permuted_tokens.dtype:
    out[t] = sum over rows r of token t of permuted_tokens[r] * prob of row r, accumulated in fp32.
    The prob of row r is probs[t, e] for the expert e whose block holds r (blocks of routing_map's
    column counts, or of N // E rows with ``drop_and_pad``). ``fused`` is accepted and ignored.
    Differentiable in permuted_tokens and probs.
    """
    del fused
    check_float("permuted_tokens", permuted_tokens)
    check_shape("permuted_tokens", permuted_tokens, 2, "[N, H]")
    check_index("sorted_indices", sorted_indices)
    rows, hidden = permuted_tokens.shape
    if sorted_indices.shape != (rows,):
        raise ValueError(f"sorted_indices must have shape [N] = [{rows}] (the rows of permuted_tokens), "
                         f"got {tuple(sorted_indices.shape)}")
    restore = tuple(int(d) for d in restore_shape)
    if len(restore) != 2 or restore[1] != hidden:
        raise ValueError(f"restore_shape must be (T, H) with H = {hidden}, got {restore}")
    num_tokens = restore[0]
    row_weight = None
    if probs is not None:
        if routing_map is None:
            raise ValueError("routing_map [T, E] is required when probs is given")
        routing_map = _check_routing_map(routing_map, num_tokens)
        _check_probs_like_map(probs, routing_map)
        check_same_device(permuted_tokens=permuted_tokens, routing_map=routing_map, probs=probs)
        num_experts = routing_map.shape[1]
        if drop_and_pad:
            if rows % num_experts:
                raise ValueError(f"with drop_and_pad, permuted_tokens must have a multiple of E = {num_experts} "
                                 f"rows (E blocks of capacity rows), got {rows}")
            expert = torch.arange(num_experts, device=sorted_indices.device).repeat_interleave(rows // num_experts)
            row_slot = sorted_indices.long() * num_experts + expert
        else:
            row_slot = moe_sort_routing_map(routing_map, -1)
            routed = row_slot.shape[0]
            if torch.compiler.is_compiling():
                torch._check_value(routed == rows)
            elif routed != rows:
                raise ValueError(f"routing_map routes {routed} (token, expert) pairs but permuted_tokens has {rows} rows")
        row_weight = probs.reshape(-1).index_select(0, row_slot)
    check_same_device(permuted_tokens=permuted_tokens, sorted_indices=sorted_indices)
    return moe_combine(permuted_tokens, sorted_indices, row_weight, num_tokens)


# The names Megatron's token dispatchers call (moe_utils.permute / unpermute).
megatron_permute = moe_permute_with_routing_map
megatron_unpermute = moe_unpermute_with_routing_map
