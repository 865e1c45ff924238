"""Flash attention with log-sum-exp in Triton: forward, and backward as two kernels (dK/dV, then dQ).

Tensors stay in [B, S, H, D] (any strides with a unit last stride); the mask [B, Sq, Sk] is read
through its strides (an expanded key-padding mask costs no memory). Scores, softmax statistics and
accumulators are fp32; the forward keeps a running max and sum per query row
(online softmax), and a row that has seen no key yet keeps a zero sum (never exp(-inf - -inf)).
The interpreter cannot multiply bf16 tiles, so there they are widened to fp32 first.
Causal kernels stop at the diagonal. The dK/dV kernel loops over the query heads
that share a key/value head, so grouped-query attention needs no repeated heads and no atomics.
Dropout draws its keep mask in the kernels with ``tl.randint`` (Philox) from the seed tensor and the
element's position, the stream :func:`mm_kernels.reference.attention.dropout_keep` defines; the
backward draws it again, nothing is stored.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mm_kernels.dispatch import triton_interpreted
from mm_kernels.reference.attention import dropout_threshold


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(base, rows, stride_s, offs_d, seq, head_dim):
    """Rows ``rows`` of the [seq, head_dim] slice at ``base`` as a tile, zeros outside it."""
    mask = (rows[:, None] < seq) & (offs_d[None, :] < head_dim)
    return tl.load(base + rows[:, None] * stride_s + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _visible(M, smb, smq, smk, b, rows, cols, seq_q, seq_k, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """[rows, cols] mask of the keys each query sees (rows past the sequence hold zeros, no mask needed)."""
    keep = (cols[None, :] < seq_k) & (rows[:, None] >= 0)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        inside = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
        hidden = tl.load(M + b * smb + rows[:, None] * smq + cols[None, :] * smk, mask=inside, other=1)
        keep = keep & (hidden == 0)
    return keep


@triton.jit
def _dropout_scale(SEED, b, h, heads_q, rows, cols, seq_q, seq_k, threshold, inv_keep):
    """[rows, cols] tile of keep / (1 - p): the Philox draw of each (b, h, row, col) (see the module doc)."""
    seed = tl.load(SEED)
    counter = ((b * heads_q + h).to(tl.int64) * seq_q + rows[:, None]) * seq_k + cols[None, :]
    random31 = (tl.randint(seed, counter) >> 1).to(tl.int32)
    return tl.where(random31 >= threshold, inv_keep, 0.0)


@triton.jit
def _query_block(heads_q, group, BLOCK_M: tl.constexpr):
    """This program's query block: (block index, batch * head index, batch, head, key/value head, rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % heads_q
    return pid_m, pid_bh, pid_bh // heads_q, h, h // group, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, M, SEED,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, smb, smq, smk,
    seq_q, seq_k, heads_q, group, head_dim, scale, threshold, inv_keep,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_bh, b, h, hk, rows = _query_block(heads_q, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqs, offs_d, seq_q, head_dim)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = seq_k
    if CAUSAL:
        end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b * skb + hk * skh, cols, sks, offs_d, seq_k, head_dim)
        v = _load_rows(V + b * svb + hk * svh, cols, svs, offs_d, seq_k, head_dim)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST).to(tl.float32) * scale
        visible = _visible(M, smb, smq, smk, b, rows, cols, seq_q, seq_k, CAUSAL, HAS_MASK)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: p and alpha are 0
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = p * _dropout_scale(SEED, b, h, heads_q, rows, cols, seq_q, seq_k, threshold, inv_keep)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST).to(tl.float32)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key: out 0, lse -inf (its max)
    out = acc / l_i[:, None]
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    tl.store(Out + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LSE + pid_bh * seq_q + rows, m_i + tl.log(l_i), mask=rows < seq_q)


@triton.jit
def _block_grads(q, k, v, do, lse, delta, visible, dropout, scale,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Kept probabilities P Z [rows, cols] (P against the given lse, Z the dropout scale) and
    dS = P * ((dO V^T) Z - delta)."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST).to(tl.float32) * scale
    p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST).to(tl.float32)
    if DROPOUT:
        return p * dropout, p * (dp * dropout - delta[:, None])
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, M, SEED,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, smb, smq, smk,
    seq_q, seq_k, heads_q, heads_kv, group, head_dim, scale, threshold, inv_keep,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads_kv
    hk = pid_bh % heads_kv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * skb + hk * skh, cols, sks, offs_d, seq_k, head_dim)
    v = _load_rows(V + b * svb + hk * svh, cols, svs, offs_d, seq_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    first = 0
    if CAUSAL:
        first = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for g in range(0, group):
        h = hk * group + g
        for start_m in range(first, seq_q, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(Q + b * sqb + h * sqh, rows, sqs, offs_d, seq_q, head_dim)
            do = _load_rows(DO + b * sdb + h * sdh, rows, sds, offs_d, seq_q, head_dim)
            lse = tl.load(LSE + (b * heads_q + h) * seq_q + rows, mask=rows < seq_q, other=0.0)
            delta = tl.load(DELTA + (b * heads_q + h) * seq_q + rows, mask=rows < seq_q, other=0.0)
            visible = _visible(M, smb, smq, smk, b, rows, cols, seq_q, seq_k, CAUSAL, HAS_MASK)
            dropout = 1.0
            if DROPOUT:
                dropout = _dropout_scale(SEED, b, h, heads_q, rows, cols, seq_q, seq_k, threshold, inv_keep)
            p, ds = _block_grads(q, k, v, do, lse, delta, visible, dropout, scale, DROPOUT, PRECISION, UPCAST)
            dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST).to(tl.float32)
            dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST).to(tl.float32)
    mask = (cols[:, None] < seq_k) & (offs_d[None, :] < head_dim)
    out_off = (b * seq_k + cols[:, None]) * heads_kv * head_dim + hk * head_dim + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, M, SEED,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, smb, smq, smk,
    seq_q, seq_k, heads_q, group, head_dim, scale, threshold, inv_keep,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m, pid_bh, b, h, hk, rows = _query_block(heads_q, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqs, offs_d, seq_q, head_dim)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sds, offs_d, seq_q, head_dim)
    lse = tl.load(LSE + pid_bh * seq_q + rows, mask=rows < seq_q, other=0.0)
    delta = tl.load(DELTA + pid_bh * seq_q + rows, mask=rows < seq_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end = seq_k
    if CAUSAL:
        end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b * skb + hk * skh, cols, sks, offs_d, seq_k, head_dim)
        v = _load_rows(V + b * svb + hk * svh, cols, svs, offs_d, seq_k, head_dim)
        visible = _visible(M, smb, smq, smk, b, rows, cols, seq_q, seq_k, CAUSAL, HAS_MASK)
        dropout = 1.0
        if DROPOUT:
            dropout = _dropout_scale(SEED, b, h, heads_q, rows, cols, seq_q, seq_k, threshold, inv_keep)
        _, ds = _block_grads(q, k, v, do, lse, delta, visible, dropout, scale, DROPOUT, PRECISION, UPCAST)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST).to(tl.float32)
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    out_off = (b * seq_q + rows[:, None]) * heads_q * head_dim + h * head_dim + offs_d[None, :]
    tl.store(DQ + out_off, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _config(q: Tensor) -> dict:
    block = 16 if triton_interpreted() else 64
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=triton_interpreted() and q.dtype == torch.bfloat16)


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


def _extras(q: Tensor, mask: Optional[Tensor], causal: bool, dropout_p: float, seed: Optional[Tensor]):
    """(mask and seed pointers, mask strides, dropout threshold and scale, constexprs): the mask's and
    dropout's kernel arguments (the mask read as bytes; q stands in for absent tensors)."""
    mask_bytes = mask.view(torch.uint8) if mask is not None else q
    mask_strides = list(mask.stride()) if mask is not None else [0, 0, 0]
    dropout = dropout_p > 0
    scalars = [dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)]
    flags = dict(CAUSAL=causal, HAS_MASK=mask is not None, DROPOUT=dropout, **_config(q))
    return [mask_bytes, seed if dropout else q], mask_strides, scalars, flags


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                  dropout_p: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, seq_q, heads_q, dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    pointers, mask_strides, scalars, flags = _extras(q, mask, causal, dropout_p, seed)
    grid = (triton.cdiv(seq_q, flags["BLOCK_M"]), batch * heads_q)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *pointers, *_strides(q, k, v, out), *mask_strides, seq_q, k.shape[1],
                           heads_q, heads_q // k.shape[2], dim, scale, *scalars, **flags)
    return out, lse


def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
                  causal: bool, scale: float, dropout_p: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    batch, seq_q, heads_q, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    pointers, mask_strides, scalars, flags = _extras(q, mask, causal, dropout_p, seed)
    strides = [*_strides(q, k, v, dout), *mask_strides]
    group = heads_q // heads_kv
    grid_kv = (triton.cdiv(seq_k, flags["BLOCK_N"]), batch * heads_kv)
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, dout, lse, delta, dk, dv, *pointers, *strides, seq_q, seq_k, heads_q,
                                   heads_kv, group, dim, scale, *scalars, **flags)
    grid_q = (triton.cdiv(seq_q, flags["BLOCK_M"]), batch * heads_q)
    _attn_bwd_dq_kernel[grid_q](q, k, v, dout, lse, delta, dq, *pointers, *strides, seq_q, seq_k, heads_q, group, dim,
                                scale, *scalars, **flags)
    return dq, dk, dv
