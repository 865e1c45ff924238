"""Scaled dot-product attention that also returns the log-sum-exp: the ``mm_kernels::attention_*`` operators.

The building block of context-parallel attention (partial results over key blocks are merged with
their lse). Layout [B, S, H, D]; grouped-query attention when Hq is a multiple of Hkv (query head h
uses key/value head h // (Hq // Hkv)); ``causal`` masks key j for query i when j > i (top-left
aligned, as torch's ``is_causal``). lse is fp32 (fp64 for fp64 inputs) and carries no gradient.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from mm_kernels import contract
from mm_kernels.ops._checks import check_float, check_same_device, check_shape
from mm_kernels.ops._kernel_op import KernelOp
from mm_kernels.precision import compute_dtype


def _lse_like(q: Tensor) -> Tensor:
    batch, seq_q, heads_q, _ = q.shape
    return q.new_empty(batch, heads_q, seq_q, dtype=compute_dtype(q.dtype))


def _dense_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _forward_without_work(q, k, v, causal, scale):
    """The outputs when there is nothing to compute (no query, or no key: out 0, lse -inf), else None."""
    if q.numel() == 0:
        return _dense_like(q), _lse_like(q)
    if k.shape[1] == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), _lse_like(q).fill_(float("-inf"))
    return None


def _backward_without_work(dout, q, k, v, out, lse, causal, scale):
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return None


attention_fwd = KernelOp(contract.Attention, "attention_fwd", before=_forward_without_work)
attention_bwd = KernelOp(contract.Attention, "attention_bwd", before=_backward_without_work)


@attention_fwd.register_fake
def _(q, k, v, causal, scale):
    return _dense_like(q), _lse_like(q)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale):
    return tuple(_dense_like(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd.run(ctx.backend, dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_attention_args(q: object, k: object, v: object) -> None:
    """Raises TypeError/ValueError unless q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] are float tensors of one
    dtype and device with Hq a multiple of Hkv and D >= 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        check_shape(name, t, 4, "[B, S, H, D]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    batch, _, heads_q, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"k must have shape [B={batch}, Sk, Hkv, D={dim}] (B and D of q), got {tuple(k.shape)}")
    if dim < 1:
        raise ValueError(f"q must have head dim D >= 1, got shape {tuple(q.shape)}")
    heads_kv = k.shape[2]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"the query heads Hq={heads_q} must be a multiple of the key/value heads Hkv={heads_kv}")


def default_scale(q: Tensor, softmax_scale: Optional[float]) -> float:
    """``softmax_scale``, or 1 / sqrt(D) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: Optional[float] = None
) -> tuple[Tensor, Tensor]:
    """Softmax(q k^T * scale) v with its log-sum-exp.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (fp32/fp16/bf16/fp64, Hq a multiple of Hkv), scale
    1/sqrt(D) by default -> (out [B, Sq, Hq, D] in q.dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64)).
    A query with no key (Sk = 0) gets out 0 and lse -inf. Differentiable in q, k, v (not through lse).
    """
    check_attention_args(q, k, v)
    return attention_fwd(q, k, v, bool(causal), default_scale(q, softmax_scale))
