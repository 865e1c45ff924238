"""Scaled dot-product attention with log-sum-exp in plain PyTorch (the oracle); see ``mm_kernels.ops.attention``.

Math in fp32 (fp64 for fp64 inputs). Grouped-query attention: query head h uses key/value head
h // (Hq // Hkv). ``causal`` masks key j for query i when j > i (top-left aligned).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float) -> Tensor:
    """Scaled, masked scores [B, Hkv, G, Sq, Sk] in the compute dtype."""
    acc = compute_dtype(q.dtype)
    batch, seq_q, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    qg = q.to(acc).reshape(batch, seq_q, heads_kv, heads_q // heads_kv, dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if causal:
        keep = torch.ones(seq_q, k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] compute dtype)."""
    batch, seq_q, heads_q, dim = q.shape
    scores = _scores(q, k, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype)).reshape(batch, seq_q, heads_q, dim)
    return out.to(q.dtype).contiguous(), lse.reshape(batch, heads_q, seq_q).contiguous()


def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) of :func:`attention_fwd` given dout and its (out, lse).

    The probabilities are P = exp(scores - lse) with the given lse, so a block of keys can be
    differentiated against the lse of the whole row (ring attention). With
    delta_i = sum_d dout_id * out_id: dV = P^T dO, dS = P * (dO V^T - delta), dQ = scale * dS K,
    dK = scale * dS^T Q.
    """
    batch, seq_q, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    grouped = (batch, seq_q, heads_kv, heads_q // heads_kv, dim)
    scores = _scores(q, k, causal, scale)
    acc = scores.dtype
    probs = torch.exp(scores - lse.to(acc).reshape(batch, heads_kv, heads_q // heads_kv, seq_q, 1))
    do = dout.to(acc).reshape(grouped)
    delta = (do * out.to(acc).reshape(grouped)).sum(-1).permute(0, 2, 3, 1)
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, do)
    dscores = probs * (torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc)) - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k.to(acc)).reshape(q.shape) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, q.to(acc).reshape(grouped)) * scale
    return tuple(g.to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v)))
