"""Scaled dot-product attention with log-sum-exp in plain PyTorch (the oracle); see ``mm_kernels.ops.attention``.

Math in fp32 (fp64 for fp64 inputs). Grouped-query attention: query head h uses key/value head
h // (Hq // Hkv). ``causal`` hides key j from query i when j > i (top-left aligned), ``mask``
[B, Sq, Sk] (True: hidden) hides more; a query that sees no key gets out 0 and lse -inf.

Dropout: probability (b, h, i, j) is kept when :func:`dropout_keep` says so and then scaled by
1 / (1 - p). The keep mask is a function of the seed and the position only (Philox4x32-10, counter
((b * Hq + h) * Sq + i) * Sk + j, the first 32-bit output shifted right by one compared with
``dropout_threshold(p)``), so every backend draws the same mask: Triton's ``tl.randint`` computes the
same stream in the kernel, and this module is the oracle for it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mm_kernels.precision import compute_dtype

_LOW32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUNDS = 10


def dropout_threshold(dropout_p: float) -> int:
    """The 31-bit threshold of ``dropout_p``: a probability is kept when its random 31-bit number is >= it."""
    return int(dropout_p * 2**31)


def _mul_hi_lo(factor: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of factor * x for a 32-bit ``factor`` and ``x`` holding 32-bit values in
    int64, computed in 16-bit halves so no intermediate leaves int64."""
    low_part = x * (factor & 0xFFFF)
    carry = x * (factor >> 16) + (low_part >> 16)
    return carry >> 16, ((carry & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox_uint32(seed: Tensor, counter: Tensor) -> Tensor:
    """First 32-bit word of Philox4x32-10 with key ``seed`` (int64, low word first) and counter words
    (low 32 bits of ``counter``, its high 32 bits, 0, 0); ``counter`` int64 >= 0; int64 result in [0, 2^32)."""
    k0, k1 = seed & _LOW32, (seed >> 32) & _LOW32
    c0, c1 = counter & _LOW32, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _LOW32, (k1 + _PHILOX_KEY_B) & _LOW32
    return c0


def dropout_keep(seed: Tensor, dropout_p: float, batch: int, heads: int, seq_q: int, seq_k: int) -> Tensor:
    """Keep mask [batch, heads, seq_q, seq_k] bool of attention dropout for ``seed`` (int64 [1])."""
    counter = torch.arange(batch * heads * seq_q * seq_k, dtype=torch.int64, device=seed.device)
    random31 = philox_uint32(seed.reshape(()), counter) >> 1
    return (random31 >= dropout_threshold(dropout_p)).reshape(batch, heads, seq_q, seq_k)


def hidden_keys(mask: Optional[Tensor], causal: bool, seq_q: int, seq_k: int, device: torch.device) -> Optional[Tensor]:
    """[B or 1, Sq, Sk] bool: True where a key is hidden from a query (``mask`` and causality); None: none."""
    hidden = None
    if causal:
        hidden = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).triu(diagonal=1).unsqueeze(0)
    if mask is not None:
        hidden = mask if hidden is None else hidden | mask
    return hidden


def blind_rows(mask: Optional[Tensor], causal: bool, seq_q: int, seq_k: int, device: torch.device) -> Optional[Tensor]:
    """[B, Sq] bool: True for a query that sees no key under ``mask`` (None without a mask: causality
    alone hides no whole row when Sk >= 1)."""
    if mask is None:
        return None
    return hidden_keys(mask, causal, seq_q, seq_k, device).all(dim=-1)


def _scores(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    """Scaled, masked scores [B, Hkv, G, Sq, Sk] in the compute dtype."""
    acc = compute_dtype(q.dtype)
    batch, seq_q, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    qg = q.to(acc).reshape(batch, seq_q, heads_kv, heads_q // heads_kv, dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    hidden = hidden_keys(mask, causal, seq_q, k.shape[1], q.device)
    if hidden is not None:
        scores = scores.masked_fill(hidden[:, None, None], float("-inf"))
    return scores


def _probabilities(scores: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse): 0 for a row that sees no key (lse -inf), not NaN."""
    return torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))


def _dropout_scale(q: Tensor, k: Tensor, dropout_p: float, seed: Optional[Tensor], dtype: torch.dtype):
    """keep / (1 - p) as [B, Hkv, G, Sq, Sk] in ``dtype``, or None without dropout."""
    if dropout_p == 0:
        return None
    batch, seq_q, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    keep = dropout_keep(seed, dropout_p, batch, heads_q, seq_q, k.shape[1])
    return (keep.to(dtype) / (1.0 - dropout_p)).reshape(batch, heads_kv, heads_q // heads_kv, seq_q, k.shape[1])


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D] q.dtype, lse [B, Hq, Sq] compute dtype)."""
    batch, seq_q, heads_q, dim = q.shape
    scores = _scores(q, k, mask, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = _probabilities(scores, lse)
    dropout = _dropout_scale(q, k, dropout_p, seed, probs.dtype)
    if dropout is not None:
        probs = probs * dropout
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.to(probs.dtype)).reshape(batch, seq_q, heads_q, dim)
    return out.to(q.dtype).contiguous(), lse.reshape(batch, heads_q, seq_q).contiguous()


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) of :func:`attention_fwd` given dout and its (out, lse).

    The probabilities are P = exp(scores - lse) with the given lse, so a block of keys can be
    differentiated against the lse of the whole row (ring attention). With the dropout scale Z
    (1 without dropout) and delta_i = sum_d dout_id * out_id: dV = (P Z)^T dO,
    dS = P * ((dO V^T) Z - delta), dQ = scale * dS K, dK = scale * dS^T Q.
    """
    batch, seq_q, heads_q, dim = q.shape
    heads_kv = k.shape[2]
    grouped = (batch, seq_q, heads_kv, heads_q // heads_kv, dim)
    scores = _scores(q, k, mask, causal, scale)
    acc = scores.dtype
    probs = _probabilities(scores, lse.to(acc).reshape(batch, heads_kv, heads_q // heads_kv, seq_q))
    do = dout.to(acc).reshape(grouped)
    delta = (do * out.to(acc).reshape(grouped)).sum(-1).permute(0, 2, 3, 1)
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc))
    dropout = _dropout_scale(q, k, dropout_p, seed, acc)
    kept = probs if dropout is None else probs * dropout
    if dropout is not None:
        dprobs = dprobs * dropout
    dv = torch.einsum("bhgqk,bqhgd->bkhd", kept, do)
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k.to(acc)).reshape(q.shape) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, q.to(acc).reshape(grouped)) * scale
    return tuple(g.to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v)))
