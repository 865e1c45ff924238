"""SwiGLU in Triton: silu(a) * b in fp32, forward and backward (silu recomputed from the input).

Both forms run one kernel over a [rows, n] layout whose a and b rows sit ``in_stride`` elements
apart: ``x`` contiguous viewed as [outer, 2, n] (a = x[:, 0], b = x[:, 1], in_stride = 2n), or
gate and up flattened to one row. One program handles a tile of up to MAX_TILE columns of one
row (16-byte vector loads and stores), with 4 or 8 warps by tile size.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Columns per program (at most): 4096 bf16 elements are 8 KiB per input row tile.
MAX_TILE = 4096


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, n, in_stride, tiles_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles_per_row
    cols = (pid % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(a_ptr + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + row * n + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, in_stride, tiles_per_row, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles_per_row
    cols = (pid % tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    offsets = row * in_stride + cols
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    tl.store(da_ptr + offsets, (g * b * (s + silu * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offsets, (g * silu).to(db_ptr.dtype.element_ty), mask=mask)


def _rows_and_width(x: Tensor, dim: int) -> tuple[int, int]:
    """x [..., 2F at dim, ...] contiguous as [rows, 2, n]: (rows, n)."""
    return math.prod(x.shape[:dim]), x.shape[dim] // 2 * math.prod(x.shape[dim + 1:])


def _launch(kernel, rows: int, n: int, *args) -> None:
    """Runs ``kernel`` over a [rows, n] layout, one program per tile of one row."""
    if rows * n == 0:
        return
    block = min(MAX_TILE, triton.next_power_of_2(n))
    tiles_per_row = triton.cdiv(n, block)
    kernel[(rows * tiles_per_row,)](*args, tiles_per_row, BLOCK=block, num_warps=4 if block <= 1024 else 8)


def _launch_fwd(a: Tensor, b: Tensor, y: Tensor, rows: int, n: int, in_stride: int) -> None:
    _launch(_swiglu_fwd_kernel, rows, n, a, b, y, n, in_stride)


def _launch_bwd(dy: Tensor, a: Tensor, b: Tensor, da: Tensor, db: Tensor, rows: int, n: int, in_stride: int) -> None:
    _launch(_swiglu_bwd_kernel, rows, n, dy, a, b, da, db, n, in_stride)


def swiglu_fwd(x: Tensor, dim: int) -> Tensor:
    """x [..., 2F, ...] -> silu(a) * b [..., F, ...] (halves along ``dim`` >= 0)."""
    x = x.contiguous()
    rows, n = _rows_and_width(x, dim)
    shape = list(x.shape)
    shape[dim] //= 2
    y = x.new_empty(shape)
    flat = x.view(-1)
    _launch_fwd(flat, flat[n:], y, rows, n, 2 * n)
    return y


def swiglu_bwd(dy: Tensor, x: Tensor, dim: int) -> Tensor:
    """dy [..., F, ...], x [..., 2F, ...] -> dx like x."""
    x, dy = x.contiguous(), dy.contiguous()
    rows, n = _rows_and_width(x, dim)
    dx = torch.empty_like(x)
    flat, dflat = x.view(-1), dx.view(-1)
    _launch_bwd(dy, flat, flat[n:], dflat, dflat[n:], rows, n, 2 * n)
    return dx


def swiglu_pair_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [...] -> silu(gate) * up [...]."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    _launch_fwd(gate, up, y, 1, gate.numel(), 0)
    return y


def swiglu_pair_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """dy, gate, up [...] -> (dgate, dup)."""
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    _launch_bwd(dy, gate, up, dgate, dup, 1, gate.numel(), 0)
    return dgate, dup
