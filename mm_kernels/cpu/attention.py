"""Attention with log-sum-exp on CPU: ATen's flash-attention CPU kernels (blocked, causal blocks skipped).

ATen works in [B, H, S, D] with as many key/value heads as query heads. Grouped-query attention
(G = Hq / Hkv query heads per key/value head) runs G calls, call g taking the query heads g, G + g,
2G + g, ... (a strided view) against the unrepeated keys and values; dK and dV add up the G calls
in fp32. The mask goes in as an additive mask of q's dtype, broadcast dimensions kept broadcast.
ATen reports lse 0 for a query that sees no key: such rows get -inf here (out is already 0), and
their backward gets a finite lse back.

Reference instead: dropout (ATen's CPU kernel has none), and non-finite q or k with fewer than 16
keys (there ATen turns a score row holding a NaN from q into a finite one, so the NaN would vanish;
from 16 keys on it propagates as in the reference, and the inputs are not scanned).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype
from mm_kernels.reference import attention as reference

# Below this many keys ATen's kernel turns a score row holding a NaN from q into a finite one.
_NAN_SAFE_KEYS = 16


def _runs_on_reference(q: Tensor, k: Tensor, dropout_p: float) -> bool:
    if dropout_p > 0:
        return True
    return k.shape[1] < _NAN_SAFE_KEYS and not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all()))


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """mask [B, Sq, Sk] bool -> [B, 1, Sq, Sk] additive (-inf where hidden) in ``dtype``; broadcast
    (stride 0) dimensions are converted once and stay broadcast."""
    if mask is None:
        return None
    compact = mask
    for dim in range(mask.dim()):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            compact = compact.narrow(dim, 0, 1)
    additive = torch.zeros(compact.shape, dtype=dtype).masked_fill_(compact, float("-inf"))
    return additive.expand(mask.shape).unsqueeze(1)


def _heads(x: Tensor, g: int, group: int) -> Tensor:
    """Query heads g, g + group, ... of x [B, S, H, D] as ATen's [B, H / group, S, D] (a view)."""
    return x[:, :, g::group].transpose(1, 2)


def _blind_rows_lse(lse: Tensor, mask: Optional[Tensor], causal: bool, q: Tensor, k: Tensor) -> Tensor:
    """``lse`` (ATen's: 0 where a query sees no key) with -inf there."""
    blind = reference.blind_rows(mask, causal, q.shape[1], k.shape[1], q.device)
    return lse if blind is None else lse.masked_fill_(blind.unsqueeze(1), float("-inf"))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    if _runs_on_reference(q, k, dropout_p):
        return reference.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed)
    group = q.shape[2] // k.shape[2]
    additive = _additive_mask(mask, q.dtype)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if group == 1:  # ATen's output is [B, S, H, D] in memory: transposed back, it needs no copy
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), kt, vt, 0.0, causal, attn_mask=additive, scale=scale)
        return out.transpose(1, 2), _blind_rows_lse(lse.contiguous(), mask, causal, q, k)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    for g in range(group):
        out_g, lse_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads(q, g, group), kt, vt, 0.0, causal, attn_mask=additive, scale=scale)
        out[:, :, g::group] = out_g.transpose(1, 2)
        lse[:, g::group] = lse_g
    return out, _blind_rows_lse(lse, mask, causal, q, k)


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    if _runs_on_reference(q, k, dropout_p):
        return reference.attention_bwd(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed)
    group = q.shape[2] // k.shape[2]
    additive = _additive_mask(mask, q.dtype)
    lse = lse.float()
    if mask is not None:
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # rows that see no key: probabilities 0, not NaN
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    if group == 1:  # gradients come [B, S, H, D] in memory, like the output
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), kt, vt, out.transpose(1, 2), lse, 0.0, causal,
            attn_mask=additive, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = dv = None
    for g in range(group):
        dq_g, dk_g, dv_g = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads(dout, g, group), _heads(q, g, group), kt, vt, _heads(out, g, group), lse[:, g::group], 0.0,
            causal, attn_mask=additive, scale=scale)
        dq[:, :, g::group] = dq_g.transpose(1, 2)
        if dk is None:
            dk, dv = dk_g.to(compute_dtype(k.dtype)), dv_g.to(compute_dtype(v.dtype))
        else:
            dk += dk_g
            dv += dv_g
    return dq, dk.transpose(1, 2).to(k.dtype).contiguous(), dv.transpose(1, 2).to(v.dtype).contiguous()
