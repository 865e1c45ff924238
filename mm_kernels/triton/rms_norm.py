"""RMSNorm Triton kernels, same functions as ``mm_kernels.reference.rms_norm``.

Forward: one program per row, statistics in fp32, the row walked in chunks of at most
``MAX_BLOCK`` columns (one chunk for H <= MAX_BLOCK). Backward: a fixed number of programs
(from the row count only), each owning a contiguous run of rows; every program sums its
rows' weight gradient in fp32, then the per-program partial sums are added in program
order, so dweight does not depend on scheduling. fp32/bf16/fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 8192
# Upper bound on backward programs: each keeps one [H] fp32 partial weight gradient.
MAX_BWD_PROGRAMS = 256


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, scale_ptr, y_ptr, rstd_ptr, hidden, eps,
                         HAS_WEIGHT: tl.constexpr, ROUND_NORM: tl.constexpr, ROUND_RSTD: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * hidden
    y_row = y_ptr + row * hidden
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < hidden, other=0.0).to(tl.float32)
        acc += x * x
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(acc, axis=0) / hidden + eps))
    tl.store(rstd_ptr + row, r)
    if ROUND_RSTD:
        r = r.to(y_ptr.dtype.element_ty).to(tl.float32)
    for start in range(0, hidden, BLOCK):
        mask = start + cols < hidden
        norm = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) * r
        if HAS_WEIGHT:
            if ROUND_NORM:
                norm = norm.to(y_ptr.dtype.element_ty).to(tl.float32)
            norm = norm * tl.load(scale_ptr + start + cols, mask=mask, other=0.0)
        tl.store(y_row + start + cols, norm.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rounded_sum(x_ptr, res_ptr, offs, mask, dtype: tl.constexpr):
    """x + residual added in fp32 and rounded to their dtype (as torch adds 16-bit floats)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)


@triton.jit
def _add_rms_norm_fwd_kernel(x_ptr, res_ptr, scale_ptr, y_ptr, sum_ptr, rstd_ptr, hidden, eps,
                             HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hidden, BLOCK):
        offs = row * hidden + start + cols
        mask = start + cols < hidden
        summed = _rounded_sum(x_ptr, res_ptr, offs, mask, sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offs, summed, mask=mask)
        s = summed.to(tl.float32)
        acc += s * s
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(acc, axis=0) / hidden + eps))
    tl.store(rstd_ptr + row, r)
    for start in range(0, hidden, BLOCK):
        offs = row * hidden + start + cols
        mask = start + cols < hidden
        norm = _rounded_sum(x_ptr, res_ptr, offs, mask, sum_ptr.dtype.element_ty).to(tl.float32) * r
        if HAS_WEIGHT:
            norm = norm.to(y_ptr.dtype.element_ty).to(tl.float32)
            norm = norm * tl.load(scale_ptr + start + cols, mask=mask, other=0.0)
        tl.store(y_ptr + offs, norm.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, gscale_ptr, rstd_ptr, dx_ptr, partial_ptr, rows, hidden, rows_per_program,
                         HAS_WEIGHT: tl.constexpr, ROUND_NORM: tl.constexpr, ONE_CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    partial_row = partial_ptr + pid * hidden
    dweight_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    for row in range(row_begin, row_end):
        r = tl.load(rstd_ptr + row)
        base = row * hidden
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            g = tl.load(dy_ptr + base + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                g = g * tl.load(gscale_ptr + start + cols, mask=mask, other=0.0)
            dot += g * (tl.load(x_ptr + base + start + cols, mask=mask, other=0.0).to(tl.float32) * r)
        mean_gn = tl.sum(dot, axis=0) / hidden
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            dy = tl.load(dy_ptr + base + start + cols, mask=mask, other=0.0).to(tl.float32)
            norm = tl.load(x_ptr + base + start + cols, mask=mask, other=0.0).to(tl.float32) * r
            g = dy
            if HAS_WEIGHT:
                g = dy * tl.load(gscale_ptr + start + cols, mask=mask, other=0.0)
            dx = r * (g - norm * mean_gn)
            tl.store(dx_ptr + base + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                if ROUND_NORM:
                    norm = norm.to(dx_ptr.dtype.element_ty).to(tl.float32)
                if ONE_CHUNK:
                    dweight_acc += dy * norm
                else:
                    partial = tl.load(partial_row + start + cols, mask=mask, other=0.0)
                    tl.store(partial_row + start + cols, partial + dy * norm, mask=mask)
    if HAS_WEIGHT and ONE_CHUNK:
        tl.store(partial_row + cols, dweight_acc, mask=cols < hidden)


def _block(hidden: int) -> int:
    return min(triton.next_power_of_2(hidden), MAX_BLOCK)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _as_rows(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _forward_scale(weight: Tensor | None, casting: str, offset: float, dtype: torch.dtype) -> Tensor | None:
    """The fp32 factor of the forward, (offset + weight) rounded as the reference rounds it."""
    if weight is None:
        return None
    if casting == "gemma":
        return (weight.float() + offset).contiguous()
    return (weight + offset).to(dtype).float().contiguous()


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor]:
    """x [..., H], weight [H] or None -> (y [..., H] in x.dtype, rstd [...] fp32; fp64 for fp64 x)."""
    x2 = _as_rows(x)
    rows, hidden = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        scale = _forward_scale(weight, casting, offset, x.dtype)
        block = _block(hidden)
        _rms_norm_fwd_kernel[(rows,)](
            x2, x2 if scale is None else scale, y, rstd, hidden, eps,
            HAS_WEIGHT=scale is not None, ROUND_NORM=casting != "gemma", ROUND_RSTD=casting == "none",
            BLOCK=block, num_warps=_num_warps(block),
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients (dx like x, dweight like weight or None); dweight summed in fp32 in a fixed order."""
    x2, dy2 = _as_rows(x), _as_rows(dy)
    rows, hidden = x2.shape
    dx = torch.empty_like(x2)
    block = _block(hidden)
    rows_per_program = max(1, triton.cdiv(rows, MAX_BWD_PROGRAMS))
    programs = triton.cdiv(rows, rows_per_program)
    partial = torch.zeros(programs if weight is not None else 0, hidden, dtype=torch.float32, device=x.device)
    if rows > 0:
        gscale = None if weight is None else (weight.float() + offset).contiguous()
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, x2 if gscale is None else gscale, rstd.contiguous(), dx, partial, rows, hidden,
            rows_per_program, HAS_WEIGHT=gscale is not None, ROUND_NORM=casting == "llama",
            ONE_CHUNK=hidden <= block, BLOCK=block, num_warps=_num_warps(block),
        )
    dweight = None if weight is None else partial.sum(dim=0).to(weight.dtype)
    return dx.view(x.shape), dweight


def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """x, residual [..., H] -> (y, rstd [...] fp32, x + residual): llama RMSNorm of the residual sum."""
    x2, res2 = _as_rows(x), _as_rows(residual)
    rows, hidden = x2.shape
    y, summed = torch.empty_like(x2), torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        scale = _forward_scale(weight, "llama", 0.0, x.dtype)
        block = _block(hidden)
        _add_rms_norm_fwd_kernel[(rows,)](
            x2, res2, x2 if scale is None else scale, y, summed, rstd, hidden, eps,
            HAS_WEIGHT=scale is not None, BLOCK=block, num_warps=_num_warps(block),
        )
    return y.view(x.shape), rstd.view(x.shape[:-1]), summed.view(x.shape)
