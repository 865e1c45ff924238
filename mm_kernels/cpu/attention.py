"""Attention with log-sum-exp on CPU: ATen's flash-attention CPU kernels (blocked, causal blocks skipped).

ATen works in [B, H, S, D] and needs as many key/value heads as query heads, so grouped-query
key/value heads are repeated for the call and their gradients summed back in fp32.
With fewer than 16 keys ATen turns a score row holding a NaN into a finite one (lse 0), so a NaN
in q or k would vanish; such inputs (any non-finite q or k) run the reference, which propagates it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype
from mm_kernels.reference import attention as reference


def _repeat_heads(x: Tensor, group: int) -> Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _sum_heads(grad: Tensor, heads_kv: int, dtype: torch.dtype) -> Tensor:
    batch, seq, heads, dim = grad.shape
    if heads == heads_kv:
        return grad.contiguous()
    grouped = grad.to(compute_dtype(dtype)).reshape(batch, seq, heads_kv, heads // heads_kv, dim)
    return grouped.sum(dim=3).to(dtype)


def _finite(q: Tensor, k: Tensor) -> bool:
    return bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    if not _finite(q, k):
        return reference.attention_fwd(q, k, v, causal, scale)
    group = q.shape[2] // k.shape[2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), _repeat_heads(k, group).transpose(1, 2), _repeat_heads(v, group).transpose(1, 2),
        0.0, causal, scale=scale,
    )
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    if not _finite(q, k):
        return reference.attention_bwd(dout, q, k, v, out, lse, causal, scale)
    heads_kv = k.shape[2]
    group = q.shape[2] // heads_kv
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2), q.transpose(1, 2), _repeat_heads(k, group).transpose(1, 2),
        _repeat_heads(v, group).transpose(1, 2), out.transpose(1, 2), lse, 0.0, causal, scale=scale,
    )
    return (dq.transpose(1, 2).contiguous(), _sum_heads(dk.transpose(1, 2), heads_kv, k.dtype),
            _sum_heads(dv.transpose(1, 2), heads_kv, v.dtype))
