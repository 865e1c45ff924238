"""RMSNorm as Triton kernels: the kernels of :class:`mm_kernels.contract.RMSNorm` for fp32, bf16 and fp16.

Statistics and arithmetic in fp32, roundings where the reference rounds (``mm_kernels.reference.rms_norm``);
the weight is read in its own dtype and turned into the (offset + weight) factor inside the kernels.
- A row of up to ``MAX_BLOCK`` columns is read once into registers: a program handles a tile of ROWS
  rows x BLOCK columns (about ``TILE_ELEMS`` elements, so short rows are batched), with 4 to 16 warps
  by tile size. Longer rows are walked in chunks, one row per program.
- Backward: a fixed number of programs (from the row count only), each owning a contiguous run of
  rows, sums its rows' weight gradient in fp32 registers; the per-program partial sums are then added
  in program order, so dweight does not depend on scheduling and costs one small extra reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Longest row held in registers in one piece.
MAX_BLOCK = 8192
# Elements per program tile: rows shorter than this are processed several at a time.
TILE_ELEMS = 4096
# Backward programs (at most): each writes one [H] fp32 partial weight gradient.
MAX_BWD_PROGRAMS = 256


@triton.jit
def _scale(w_ptr, cols, mask, offset, X_DTYPE: tl.constexpr, ROUND_SCALE: tl.constexpr):
    """The fp32 factor (offset + weight): rounded to the weight's dtype then x's dtype with ROUND_SCALE
    (llama, none), exact in fp32 otherwise (gemma, and every gradient)."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    scale = w.to(tl.float32) + offset
    if ROUND_SCALE:
        scale = scale.to(w.dtype).to(X_DTYPE).to(tl.float32)
    return scale


@triton.jit
def _normalize(x, r, w_ptr, cols, col_mask, offset, Y_DTYPE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               ROUND_NORM: tl.constexpr):
    """x * r (rounded to the output dtype with ROUND_NORM) * (offset + weight), in fp32."""
    norm = x * r
    if HAS_WEIGHT:
        if ROUND_NORM:
            norm = norm.to(Y_DTYPE).to(tl.float32)
        norm = norm * _scale(w_ptr, cols, col_mask, offset, Y_DTYPE, ROUND_NORM)
    return norm


@triton.jit
def _row_tile(rows, hidden, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of ROWS rows: (rows [ROWS], columns [BLOCK], column mask, tile mask, offsets)."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < hidden
    return row, cols, col_mask, (row < rows)[:, None] & col_mask[None, :], row[:, None] * hidden + cols[None, :]


@triton.jit
def _rstd(sum_squares, hidden, eps):
    return tl.div_rn(1.0, tl.sqrt_rn(sum_squares / hidden + eps))


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, hidden, eps, offset,
                HAS_WEIGHT: tl.constexpr, ROUND_NORM: tl.constexpr, ROUND_RSTD: tl.constexpr,
                BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_CHUNK: tl.constexpr):
    Y_DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    row, cols, col_mask, mask, offs = _row_tile(rows, hidden, ROWS, BLOCK)
    if ONE_CHUNK:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = _rstd(tl.sum(x * x, axis=1), hidden, eps)
        tl.store(rstd_ptr + row, r, mask=row < rows)
        if ROUND_RSTD:
            r = r.to(Y_DTYPE).to(tl.float32)
        y = _normalize(x, r[:, None], w_ptr, cols[None, :], col_mask[None, :], offset, Y_DTYPE, HAS_WEIGHT,
                       ROUND_NORM)
        tl.store(y_ptr + offs, y.to(Y_DTYPE), mask=mask)
    else:
        # One row (ROWS == 1) walked in chunks of BLOCK columns: statistics, then the output.
        base = row * hidden
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            x = tl.load(x_ptr + base[:, None] + start + cols[None, :], mask=(start + cols < hidden)[None, :],
                        other=0.0).to(tl.float32)
            acc += x * x
        r = _rstd(tl.sum(acc, axis=1), hidden, eps)
        tl.store(rstd_ptr + row, r)
        if ROUND_RSTD:
            r = r.to(Y_DTYPE).to(tl.float32)
        for start in range(0, hidden, BLOCK):
            chunk_mask = start + cols < hidden
            chunk_offs = base[:, None] + start + cols[None, :]
            x = tl.load(x_ptr + chunk_offs, mask=chunk_mask[None, :], other=0.0).to(tl.float32)
            y = _normalize(x, r[:, None], w_ptr, start + cols[None, :], chunk_mask[None, :], offset, Y_DTYPE,
                           HAS_WEIGHT, ROUND_NORM)
            tl.store(y_ptr + chunk_offs, y.to(Y_DTYPE), mask=chunk_mask[None, :])


@triton.jit
def _add_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, rstd_ptr, rows, hidden, eps,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """x + residual (added in fp32, rounded to x's dtype as torch adds), then llama RMSNorm of the sum."""
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    row, cols, col_mask, mask, offs = _row_tile(rows, hidden, ROWS, BLOCK)
    if ONE_CHUNK:
        summed = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                  + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(DTYPE)
        tl.store(sum_ptr + offs, summed, mask=mask)
        s = summed.to(tl.float32)
        r = _rstd(tl.sum(s * s, axis=1), hidden, eps)
        tl.store(rstd_ptr + row, r, mask=row < rows)
        y = _normalize(s, r[:, None], w_ptr, cols[None, :], col_mask[None, :], 0.0, DTYPE, HAS_WEIGHT, True)
        tl.store(y_ptr + offs, y.to(DTYPE), mask=mask)
    else:
        base = row * hidden
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            chunk_mask = start + cols < hidden
            chunk_offs = base[:, None] + start + cols[None, :]
            summed = (tl.load(x_ptr + chunk_offs, mask=chunk_mask[None, :], other=0.0).to(tl.float32)
                      + tl.load(res_ptr + chunk_offs, mask=chunk_mask[None, :], other=0.0).to(tl.float32)).to(DTYPE)
            tl.store(sum_ptr + chunk_offs, summed, mask=chunk_mask[None, :])
            s = summed.to(tl.float32)
            acc += s * s
        r = _rstd(tl.sum(acc, axis=1), hidden, eps)
        tl.store(rstd_ptr + row, r)
        for start in range(0, hidden, BLOCK):
            chunk_mask = start + cols < hidden
            chunk_offs = base[:, None] + start + cols[None, :]
            s = tl.load(sum_ptr + chunk_offs, mask=chunk_mask[None, :], other=0.0).to(tl.float32)
            y = _normalize(s, r[:, None], w_ptr, start + cols[None, :], chunk_mask[None, :], 0.0, DTYPE, HAS_WEIGHT,
                           True)
            tl.store(y_ptr + chunk_offs, y.to(DTYPE), mask=chunk_mask[None, :])


@triton.jit
def _grad_tile(dy, x, r, gscale, mean_gn):
    """dx of a tile given its rows' mean(g * n): r * (g - n * mean_gn) with g = dy * gscale, n = x * r."""
    return r * (dy * gscale - x * r * mean_gn)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, partial_ptr, rows, hidden, rows_per_program, offset,
                HAS_WEIGHT: tl.constexpr, ROUND_NORM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                ONE_CHUNK: tl.constexpr):
    DTYPE: tl.constexpr = dx_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    tile_rows = tl.arange(0, ROWS)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    partial_row = partial_ptr + pid * hidden
    if ONE_CHUNK:
        col_mask = cols < hidden
        gscale = tl.full([BLOCK], 1.0, dtype=tl.float32)
        if HAS_WEIGHT:
            gscale = _scale(w_ptr, cols, col_mask, offset, DTYPE, False)
        dweight = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(row_begin, row_end, ROWS):
            row = start + tile_rows
            row_mask = row < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            offs = row[:, None] * hidden + cols[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)[:, None]
            norm = x * r
            mean_gn = tl.sum(dy * gscale[None, :] * norm, axis=1)[:, None] / hidden
            tl.store(dx_ptr + offs, _grad_tile(dy, x, r, gscale[None, :], mean_gn).to(DTYPE), mask=mask)
            if HAS_WEIGHT:
                if ROUND_NORM:
                    norm = norm.to(DTYPE).to(tl.float32)
                dweight += tl.sum(dy * norm, axis=0)
        if HAS_WEIGHT:
            tl.store(partial_row + cols, dweight, mask=col_mask)
    else:
        # One row at a time in chunks; the partial weight gradient accumulates in its [H] row in memory.
        for row in range(row_begin, row_end):
            r = tl.load(rstd_ptr + row)
            base = row * hidden
            dot = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                col_mask = start + cols < hidden
                dy = tl.load(dy_ptr + base + start + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + base + start + cols, mask=col_mask, other=0.0).to(tl.float32)
                g = dy
                if HAS_WEIGHT:
                    g = dy * _scale(w_ptr, start + cols, col_mask, offset, DTYPE, False)
                dot += g * x * r
            mean_gn = tl.sum(dot, axis=0) / hidden
            for start in range(0, hidden, BLOCK):
                col_mask = start + cols < hidden
                dy = tl.load(dy_ptr + base + start + cols, mask=col_mask, other=0.0).to(tl.float32)
                x = tl.load(x_ptr + base + start + cols, mask=col_mask, other=0.0).to(tl.float32)
                gscale = tl.full([BLOCK], 1.0, dtype=tl.float32)
                if HAS_WEIGHT:
                    gscale = _scale(w_ptr, start + cols, col_mask, offset, DTYPE, False)
                tl.store(dx_ptr + base + start + cols, _grad_tile(dy, x, r, gscale, mean_gn).to(DTYPE), mask=col_mask)
                if HAS_WEIGHT:
                    norm = x * r
                    if ROUND_NORM:
                        norm = norm.to(DTYPE).to(tl.float32)
                    partial = tl.load(partial_row + start + cols, mask=col_mask, other=0.0)
                    tl.store(partial_row + start + cols, partial + dy * norm, mask=col_mask)


def _tiling(hidden: int) -> dict:
    """BLOCK (columns), ROWS (rows per program), ONE_CHUNK and num_warps for rows of ``hidden`` columns."""
    block = min(triton.next_power_of_2(hidden), MAX_BLOCK)
    one_chunk = hidden <= block
    rows = max(1, TILE_ELEMS // block) if one_chunk else 1
    elems = block * rows
    return {"BLOCK": block, "ROWS": rows, "ONE_CHUNK": one_chunk,
            "num_warps": 4 if elems <= 1024 else 8 if elems <= 4096 else 16}


def _as_rows(t: Tensor) -> Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor]:
    """x [..., H], weight [H] or None -> (y [..., H] in x.dtype, rstd [...] fp32)."""
    x2 = _as_rows(x)
    rows, hidden = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        tiling = _tiling(hidden)
        _fwd_kernel[(triton.cdiv(rows, tiling["ROWS"]),)](
            x2, x2 if weight is None else weight.contiguous(), y, rstd, rows, hidden, eps, offset,
            HAS_WEIGHT=weight is not None, ROUND_NORM=casting != "gemma", ROUND_RSTD=casting == "none", **tiling,
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float, casting: str, offset: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients (dx like x, dweight like weight or None); dweight summed in fp32 in a fixed order."""
    x2, dy2 = _as_rows(x), _as_rows(dy)
    rows, hidden = x2.shape
    dx = torch.empty_like(x2)
    rows_per_program = max(1, triton.cdiv(rows, MAX_BWD_PROGRAMS))
    programs = triton.cdiv(rows, rows_per_program)
    tiling = _tiling(hidden)
    # Chunked rows accumulate into their partial row in memory, so it starts at zero.
    make = torch.empty if tiling["ONE_CHUNK"] else torch.zeros
    partial = make(programs if weight is not None else 0, hidden, dtype=torch.float32, device=x.device)
    if rows > 0:
        _bwd_kernel[(programs,)](
            dy2, x2, x2 if weight is None else weight.contiguous(), rstd.contiguous(), dx, partial, rows, hidden,
            rows_per_program, offset, HAS_WEIGHT=weight is not None, ROUND_NORM=casting == "llama", **tiling,
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
        tiling = _tiling(hidden)
        _add_fwd_kernel[(triton.cdiv(rows, tiling["ROWS"]),)](
            x2, res2, x2 if weight is None else weight.contiguous(), y, summed, rstd, rows, hidden, eps,
            HAS_WEIGHT=weight is not None, **tiling,
        )
    return y.view(x.shape), rstd.view(x.shape[:-1]), summed.view(x.shape)
