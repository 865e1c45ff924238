"""Attention with log-sum-exp on Ascend NPUs: ``torch_npu.npu_fusion_attention`` and its gradient op.

The fused op reports the softmax statistics as a row max and a row sum (each repeated 8 times in the
last dim); lse = max + log(sum). The gradient op takes them back, so it is handed (lse, 1), which
describes the same probabilities. Causal alone uses sparse_mode 2 (top-left aligned) with the
2048 x 2048 upper-triangular mask the op expects; a mask (causality folded in) goes in as the
[B, 1, Sq, Sk] boolean mask of sparse_mode 0 (True: hidden, the op's convention too). A query that
sees no key is set to out 0 and lse -inf after the op, and its backward gets a finite lse.

Dropout runs the reference: the fused op draws its keep mask from the NPU generator and hands
the seed back, which the contract's seed-defined mask (:mod:`mm_kernels.reference.attention`) cannot take.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mm_kernels.reference import attention as reference

_STAT_WIDTH = 8
_MASK_SIZE = 2048
_LEFT_UP_CAUSAL = 2


@functools.cache
def _causal_mask(device: torch.device) -> Tensor:
    return torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device).triu(diagonal=1)


def _mask_args(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> dict:
    if mask is not None:
        hidden = reference.hidden_keys(mask, causal, q.shape[1], k.shape[1], q.device)
        return {"atten_mask": hidden.unsqueeze(1).contiguous(), "sparse_mode": 0}
    if not causal:
        return {"atten_mask": None, "sparse_mode": 0}
    return {"atten_mask": _causal_mask(q.device), "sparse_mode": _LEFT_UP_CAUSAL}


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    if dropout_p > 0:
        return reference.attention_fwd(q, k, v, mask, causal, scale, dropout_p, seed)
    import torch_npu

    out, row_max, row_sum, *_ = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), q.shape[2], "BSND", scale=scale, keep_prob=1.0,
        **_mask_args(q, k, mask, causal),
    )
    lse = row_max[..., 0] + torch.log(row_sum[..., 0])
    blind = reference.blind_rows(mask, causal, q.shape[1], k.shape[1], q.device)
    if blind is not None:
        out = out.masked_fill(blind[:, :, None, None], 0.0)
        lse = lse.masked_fill(blind.unsqueeze(1), float("-inf"))
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    if dropout_p > 0:
        return reference.attention_bwd(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed)
    import torch_npu

    lse = lse.float().masked_fill(lse == float("-inf"), 0.0)  # rows that see no key: probabilities 0
    row_max = lse.unsqueeze(-1).expand(*lse.shape, _STAT_WIDTH).contiguous()
    dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
        q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), q.shape[2], "BSND",
        softmax_max=row_max, softmax_sum=torch.ones_like(row_max), attention_in=out.contiguous(),
        scale_value=scale, keep_prob=1.0, **_mask_args(q, k, mask, causal),
    )
    return dq, dk, dv
