"""Attention with log-sum-exp on Ascend NPUs: ``torch_npu.npu_fusion_attention`` and its gradient op.

The fused op reports the softmax statistics as a row max and a row sum (each repeated 8 times in the
last dim); lse = max + log(sum). The gradient op takes them back, so it is handed (lse, 1), which
describes the same probabilities. Causal uses sparse_mode 2 (top-left aligned) with the 2048 x 2048
upper-triangular mask the op expects.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_STAT_WIDTH = 8
_MASK_SIZE = 2048
_LEFT_UP_CAUSAL = 2


@functools.cache
def _causal_mask(device: torch.device) -> Tensor:
    return torch.ones(_MASK_SIZE, _MASK_SIZE, dtype=torch.bool, device=device).triu(diagonal=1)


def _mask_args(causal: bool, device: torch.device) -> dict:
    if not causal:
        return {"atten_mask": None, "sparse_mode": 0}
    return {"atten_mask": _causal_mask(device), "sparse_mode": _LEFT_UP_CAUSAL}


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    import torch_npu

    out, row_max, row_sum, *_ = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), q.shape[2], "BSND", scale=scale, keep_prob=1.0,
        **_mask_args(causal, q.device),
    )
    return out, row_max[..., 0] + torch.log(row_sum[..., 0])


def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    import torch_npu

    row_max = lse.float().unsqueeze(-1).expand(*lse.shape, _STAT_WIDTH).contiguous()
    dq, dk, dv, *_ = torch_npu.npu_fusion_attention_grad(
        q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), q.shape[2], "BSND",
        softmax_max=row_max, softmax_sum=torch.ones_like(row_max), attention_in=out.contiguous(),
        scale_value=scale, keep_prob=1.0, **_mask_args(causal, q.device),
    )
    return dq, dk, dv
