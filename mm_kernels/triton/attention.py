"""Flash attention with log-sum-exp in Triton: forward, and backward as two kernels (dK/dV, then dQ).

Tensors stay in [B, S, H, D] (any strides with a unit last stride). Scores, softmax statistics and
accumulators are fp32; the forward keeps a running max and sum per query row
(online softmax). The interpreter cannot multiply bf16 tiles, so there they are widened to fp32 first.
Causal kernels stop at the diagonal. The dK/dV kernel loops over the query heads
that share a key/value head, so grouped-query attention needs no repeated heads and no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mm_kernels.dispatch import triton_interpreted


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
def _visible(rows, cols, seq_k, CAUSAL: tl.constexpr):
    """[rows, cols] mask of the keys each query sees (rows past the sequence hold zeros, no mask needed)."""
    keep = (cols[None, :] < seq_k) & (rows[:, None] >= 0)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@triton.jit
def _query_block(heads_q, group, BLOCK_M: tl.constexpr):
    """This program's query block: (block index, batch * head index, batch, head, key/value head, rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % heads_q
    return pid_m, pid_bh, pid_bh // heads_q, h, h // group, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    seq_q, seq_k, heads_q, group, head_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        s = tl.where(_visible(rows, cols, seq_k, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    mask = (rows[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    tl.store(Out + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LSE + pid_bh * seq_q + rows, m_i + tl.log(l_i), mask=rows < seq_q)


@triton.jit
def _block_grads(q, k, v, do, lse, delta, rows, cols, seq_k, scale,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Probabilities P [rows, cols] (against the given lse) and dS = P * (dO V^T - delta)."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST).to(tl.float32) * scale
    p = tl.where(_visible(rows, cols, seq_k, CAUSAL), tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, UPCAST).to(tl.float32)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
    seq_q, seq_k, heads_q, heads_kv, group, head_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
            p, ds = _block_grads(q, k, v, do, lse, delta, rows, cols, seq_k, scale, CAUSAL, PRECISION, UPCAST)
            dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION, UPCAST).to(tl.float32)
            dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST).to(tl.float32)
    mask = (cols[:, None] < seq_k) & (offs_d[None, :] < head_dim)
    out_off = (b * seq_k + cols[:, None]) * heads_kv * head_dim + hk * head_dim + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh,
    seq_q, seq_k, heads_q, group, head_dim, scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        _, ds = _block_grads(q, k, v, do, lse, delta, rows, cols, seq_k, scale, CAUSAL, PRECISION, UPCAST)
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


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, seq_q, heads_q, dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    cfg = _config(q)
    grid = (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads_q)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *_strides(q, k, v, out), seq_q, k.shape[1], heads_q,
                           heads_q // k.shape[2], dim, scale, CAUSAL=causal, **cfg)
    return out, lse


def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) like (q, k, v) given dout [B, Sq, Hq, D], out and lse of the forward."""
    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    batch, seq_q, heads_q, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    cfg = _config(q)
    strides = _strides(q, k, v, dout)
    group = heads_q // heads_kv
    grid_kv = (triton.cdiv(seq_k, cfg["BLOCK_N"]), batch * heads_kv)
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, dout, lse, delta, dk, dv, *strides, seq_q, seq_k, heads_q, heads_kv,
                                   group, dim, scale, CAUSAL=causal, **cfg)
    grid_q = (triton.cdiv(seq_q, cfg["BLOCK_M"]), batch * heads_q)
    _attn_bwd_dq_kernel[grid_q](q, k, v, dout, lse, delta, dq, *strides, seq_q, seq_k, heads_q, group, dim, scale,
                                CAUSAL=causal, **cfg)
    return dq, dk, dv
