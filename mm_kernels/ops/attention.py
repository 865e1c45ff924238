"""Fused scaled dot-product attention: the ``mm_kernels::attention_*`` operators.

:func:`flash_attention` is the attention of a transformer layer (masks, dropout);
:func:`attention_with_lse` also returns the log-sum-exp, the building block of context-parallel
attention (partial results over key blocks are merged with their lse). Layout [B, S, H, D];
grouped-query attention when Hq is a multiple of Hkv (query head h uses key/value head
h // (Hq // Hkv)), with K/V never repeated; ``causal`` hides key j from query i when j > i (top-left
aligned, as torch's ``is_causal``); ``mask`` hides more (True: hidden, Megatron's convention); a
query that sees no key gets out 0. lse is fp32 (fp64 for fp64 inputs) and carries no gradient.

Kernels: ATen's flash attention on CPU, the Triton kernel on CUDA, ``npu_fusion_attention`` on
Ascend. Dropout (``dropout_p`` > 0) draws a fresh seed from the device's default generator on every
call (so it follows ``torch.manual_seed`` and any RNG-state tracker that swaps that generator's
state, like Megatron's) and runs fused in the Triton kernel; on CPU and Ascend it runs the
reference (materialised probabilities), with the same keep mask.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from mm_kernels import contract
from mm_kernels.ops._checks import check_float, check_same_device, check_shape, check_tensor
from mm_kernels.ops._kernel_op import KernelOp
from mm_kernels.precision import compute_dtype


def _lse_like(q: Tensor) -> Tensor:
    batch, seq_q, heads_q, _ = q.shape
    return q.new_empty(batch, heads_q, seq_q, dtype=compute_dtype(q.dtype))


def _dense_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _forward_without_work(q, k, v, mask, causal, scale, dropout_p, seed):
    """The outputs when there is nothing to compute (no query, or no key: out 0, lse -inf), else None."""
    if q.numel() == 0:
        return _dense_like(q), _lse_like(q)
    if k.shape[1] == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), _lse_like(q).fill_(float("-inf"))
    return None


def _backward_without_work(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
    if q.numel() == 0 or k.numel() == 0:
        return tuple(torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    return None


attention_fwd = KernelOp(contract.Attention, "attention_fwd", before=_forward_without_work)
attention_bwd = KernelOp(contract.Attention, "attention_bwd", before=_backward_without_work)


@attention_fwd.register_fake
def _(q, k, v, mask, causal, scale, dropout_p, seed):
    return _dense_like(q), _lse_like(q)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
    return tuple(_dense_like(t) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq, dk, dv = attention_bwd.run(ctx.backend, dout, q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p,
                                   seed)
    return dq, dk, dv, None, None, None, None, None


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


def _checked_mask(mask: object, q: Tensor, k: Tensor) -> Optional[Tensor]:
    """``mask`` expanded (a view) to [B, Sq, Sk]; TypeError/ValueError unless it is a bool tensor on q's
    device that broadcasts to that shape."""
    if mask is None:
        return None
    check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True: the key is hidden), got {mask.dtype}")
    check_same_device(q=q, mask=mask)
    shape = (q.shape[0], q.shape[1], k.shape[1])
    try:
        return mask.expand(shape) if mask.dim() <= 3 else mask.expand(shape[0], 1, *shape[1:])[:, 0]
    except RuntimeError:
        raise ValueError(f"mask must broadcast to [B, Sq, Sk] = {list(shape)}, got {tuple(mask.shape)}") from None


def _check_dropout(dropout_p: object) -> float:
    if not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _dropout_seed(q: Tensor, dropout_p: float) -> Optional[Tensor]:
    """A fresh seed [1] int64 on q's device from its default generator (no host sync), or None."""
    if dropout_p == 0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: Optional[float] = None,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Softmax(q k^T * scale) v with its log-sum-exp.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (fp32/fp16/bf16/fp64, Hq a multiple of Hkv), scale
    1/sqrt(D) by default, ``mask`` bool broadcastable to [B, Sq, Sk] (True: hidden) or None ->
    (out [B, Sq, Hq, D] in q.dtype, lse [B, Hq, Sq] fp32 (fp64 for fp64)). A query that sees no key
    (Sk = 0, or all hidden) gets out 0 and lse -inf. Differentiable in q, k, v (not through lse).
    """
    check_attention_args(q, k, v)
    return attention_fwd(q, k, v, _checked_mask(mask, q, k), bool(causal), default_scale(q, softmax_scale), 0.0, None)


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, softmax_scale: Optional[float] = None,
    mask: Optional[Tensor] = None, dropout_p: float = 0.0,
) -> Tensor:
    """Fused softmax(q k^T * scale) v, with dropout of the probabilities.

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (fp32/fp16/bf16/fp64, Hq a multiple of Hkv; any strides),
    ``mask`` bool broadcastable to [B, Sq, Sk] (True: the key is hidden from the query; e.g. [B, 1, Sk]
    for key padding) or None, ``dropout_p`` in [0, 1) -> out [B, Sq, Hq, D] in q.dtype, 0 for a query
    that sees no key. Differentiable in q, k and v.
    """
    check_attention_args(q, k, v)
    dropout_p = _check_dropout(dropout_p)
    return attention_fwd(q, k, v, _checked_mask(mask, q, k), bool(causal), default_scale(q, softmax_scale), dropout_p,
                         _dropout_seed(q, dropout_p))[0]
