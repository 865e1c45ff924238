"""torch_npu's fused operators with torch_npu's signatures, computed by mm_kernels on any device.

Code written against torch_npu runs unchanged on a CPU or GPU machine::

    from mm_kernels import npu_compat as torch_npu

    y, rstd = torch_npu.npu_rms_norm(x, gamma, epsilon=1e-6)

Names, positional order, keyword names, defaults, output shapes and dtypes follow torch_npu's
operator schemas (``torch_npu.<name>`` is ``torch.ops.npu.<name>``, so its keywords are the schema's
argument names, ``self`` included)::

    npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)
    npu_rms_norm_backward(dy, self, gamma, rstd) -> (dx, dgamma)
    npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x)
    npu_swiglu(self, dim=-1) -> y
    npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False) -> (permuted_tokens, sorted_indices)
    npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None) -> out

Each call runs mm_kernels' fused op for the input's device (C++ on CPU, Triton on CUDA, torch_npu
itself on NPU) and is differentiable where torch_npu's is (``npu_add_rms_norm`` also is, though
torch_npu defines no gradient for it). Inputs torch_npu rejects (dtypes other than fp16/bf16/fp32,
``padded_mode=True``, which its kernels do not implement) raise a clear error here too.

Where a result can differ from the Ascend kernels in the last bit:

- ``npu_rms_norm``: the Ascend kernel sums x**2 in its own order and forms
  ``1 / sqrt(sum * (1 / n) + eps)``; rstd can differ by an fp32 ulp or two, and y = x * rstd * gamma
  (fp32, one rounding to x's dtype, both sides) then by one unit in the last place of x's dtype
  where the fp32 value lies that close to a rounding boundary.
- ``npu_add_rms_norm``: follows the Atlas A2/A3 kernels (x1 + x2 rounded to the input dtype, then
  x * rstd rounded before the multiplication by gamma); the Ascend 950 kernels normalise the
  unrounded fp32 sum with a single rounding, so fp16/bf16 results there differ by up to one ulp.
- ``npu_swiglu``: silu(a) * b in fp32 rounded once on both sides, but exp and the division are
  each platform's own: one ulp of the output dtype at rounding boundaries.
- ``npu_rms_norm_backward``: dgamma is summed over rows in fp32 in a fixed blocked order here and
  in the kernel's order on Ascend: the last fp32 bits differ.
- ``npu_moe_token_unpermute``: both sum a token's slots in fp32, in slot order, and round once;
  the Ascend kernel skips a slot whose prob is exactly 0, so an inf/NaN row with zero weight does
  not reach the output there (here 0 * inf gives NaN).
- ``npu_moe_token_permute`` only moves rows: identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mm_kernels import add_rms_norm, moe_permute, moe_unpermute, rms_norm_with_rstd, swiglu
from mm_kernels.ops._checks import check_tensor

__all__ = [
    "npu_add_rms_norm",
    "npu_moe_token_permute",
    "npu_moe_token_unpermute",
    "npu_rms_norm",
    "npu_rms_norm_backward",
    "npu_swiglu",
]

NPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_npu_float(name: str, value: object) -> Tensor:
    tensor = check_tensor(name, value)
    if tensor.dtype not in NPU_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 (as torch_npu requires), got {tensor.dtype}")
    return tensor


def _norm_layout(x: Tensor, gamma: Tensor, x_name: str) -> tuple[torch.Size, int]:
    """(leading shape, normalised size): gamma's shape must be the trailing dims of x."""
    if gamma.dim() < 1 or gamma.dim() > x.dim() or x.shape[x.dim() - gamma.dim():] != gamma.shape:
        raise ValueError(f"gamma must have the shape of the trailing dims of {x_name} {tuple(x.shape)} "
                         f"(e.g. [{x.shape[-1] if x.dim() else 'H'}]), got {tuple(gamma.shape)}")
    return x.shape[:x.dim() - gamma.dim()], gamma.numel()


def _check_gamma_dtype(gamma: Tensor, x: Tensor, mixed_ok: bool) -> None:
    if gamma.dtype == x.dtype or (mixed_ok and gamma.dtype == torch.float32 and x.dtype != torch.float32):
        return
    allowed = f"{x.dtype}" + (" or float32" if mixed_ok and x.dtype != torch.float32 else "")
    raise TypeError(f"gamma must be {allowed} for input of {x.dtype} (as torch_npu requires), got {gamma.dtype}")


def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor]:
    """torch_npu.npu_rms_norm: RMSNorm over the trailing ``gamma.dim()`` dims of ``self``.

    self [..., *g] fp16/bf16/fp32, gamma g (self's dtype, or fp32 for fp16/bf16 self) ->
    (y like self, rstd [..., 1, ..., 1] fp32 with gamma.dim() trailing ones);
    y = self * rstd * gamma computed in fp32 and rounded once. Differentiable in self and gamma.
    """
    x = _check_npu_float("self", self)
    gamma = _check_npu_float("gamma", gamma)
    _check_gamma_dtype(gamma, x, mixed_ok=True)
    lead, size = _norm_layout(x, gamma, "self")
    y, rstd = rms_norm_with_rstd(x.reshape(*lead, size), gamma.reshape(size), epsilon, casting="gemma")
    return y.reshape(x.shape), rstd.reshape(*lead, *([1] * gamma.dim()))


def npu_rms_norm_backward(dy: Tensor, self: Tensor, gamma: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """torch_npu.npu_rms_norm_backward: gradients of :func:`npu_rms_norm` from its saved rstd.

    dy, self [..., *g], gamma g, rstd from :func:`npu_rms_norm` ->
    (dx like self, dgamma of gamma's shape in fp32, as torch_npu returns it).
    """
    x = _check_npu_float("self", self)
    gamma = _check_npu_float("gamma", gamma)
    _check_gamma_dtype(gamma, x, mixed_ok=True)
    dy = _check_npu_float("dy", dy)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy must match self: {tuple(x.shape)} {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    lead, size = _norm_layout(x, gamma, "self")
    rows = x.numel() // size if size else 0
    if not isinstance(rstd, Tensor) or rstd.dtype != torch.float32 or rstd.numel() != rows:
        raise ValueError(f"rstd must be the fp32 rstd of npu_rms_norm ({rows} values, shape "
                         f"{(*lead, *([1] * gamma.dim()))}), got {getattr(rstd, 'shape', type(rstd).__name__)}")
    dx, dgamma = torch.ops.mm_kernels.rms_norm_bwd(
        dy.reshape(rows, size).contiguous(), x.reshape(rows, size), gamma.reshape(size).float(),
        rstd.reshape(rows), 0.0, "gemma", 0.0)
    return dx.reshape(x.shape), dgamma.reshape(gamma.shape)


def npu_add_rms_norm(x1: Tensor, x2: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor, Tensor]:
    """torch_npu.npu_add_rms_norm: x = x1 + x2, then RMSNorm of x over gamma's dims.

    x1, x2 [..., *g] and gamma g, all of one dtype (fp16/bf16/fp32) ->
    (y like x1, rstd [..., 1, ..., 1] fp32, x = x1 + x2 like x1).
    """
    x1 = _check_npu_float("x1", x1)
    x2 = _check_npu_float("x2", x2)
    gamma = _check_npu_float("gamma", gamma)
    if x2.shape != x1.shape or x2.dtype != x1.dtype:
        raise ValueError(f"x2 must match x1: {tuple(x1.shape)} {x1.dtype}, got {tuple(x2.shape)} {x2.dtype}")
    _check_gamma_dtype(gamma, x1, mixed_ok=False)
    lead, size = _norm_layout(x1, gamma, "x1")
    y, rstd, x = add_rms_norm(x1.reshape(*lead, size), x2.reshape(*lead, size), gamma.reshape(size), epsilon)
    return y.reshape(x1.shape), rstd.reshape(*lead, *([1] * gamma.dim())), x.reshape(x1.shape)


def npu_swiglu(self: Tensor, dim: int = -1) -> Tensor:
    """torch_npu.npu_swiglu: silu(a) * b with a, b = self.chunk(2, dim); self [..., 2F, ...] -> [..., F, ...]."""
    return swiglu(_check_npu_float("self", self), dim)


def _check_not_padded(padded_mode: object) -> None:
    if padded_mode:
        raise ValueError("padded_mode=True is not supported: torch_npu's MoE token kernels implement only "
                         "padded_mode=False")


def npu_moe_token_permute(tokens: Tensor, indices: Tensor, num_out_tokens: Optional[int] = None,
                          padded_mode: bool = False) -> tuple[Tensor, Tensor]:
    """torch_npu.npu_moe_token_permute: token copies grouped by expert.

    tokens [T, H] fp16/bf16/fp32, indices [T, K] or [T] int32/int64 ->
    (permuted_tokens [N, H] like tokens, sorted_indices [T * K] int32), where
    permuted_tokens[sorted_indices[i]] = tokens[i // K], expert-major, stable within an expert.
    N = min(num_out_tokens, T * K) when num_out_tokens > 0, else T * K + num_out_tokens
    (None or 0 keeps every copy). Differentiable in tokens.
    """
    _check_not_padded(padded_mode)
    _check_npu_float("tokens", tokens)
    kept = 0 if num_out_tokens is None else num_out_tokens
    if isinstance(kept, bool) or not isinstance(kept, int):
        raise TypeError(f"num_out_tokens must be an int or None, got {type(num_out_tokens).__name__}")
    slots = check_tensor("indices", indices).numel()
    if kept + slots < 0:
        raise ValueError(f"num_out_tokens = {kept} drops more than the T * K = {slots} token copies")
    return moe_permute(tokens, indices, num_out_tokens=kept)


def npu_moe_token_unpermute(permuted_tokens: Tensor, sorted_indices: Tensor, probs: Optional[Tensor] = None,
                            padded_mode: bool = False, restore_shape: Optional[Sequence[int]] = None) -> Tensor:
    """torch_npu.npu_moe_token_unpermute: each token's expert rows summed back into token order.

    permuted_tokens [N, H], sorted_indices [T * K] int from :func:`npu_moe_token_permute`,
    probs [T, K] or None -> out [T * K / K', H] like permuted_tokens, K' = probs.size(1) or 1:
    out[t] = sum_k permuted_tokens[sorted_indices[t * K' + k]] * probs[t, k] in fp32 (rows >= N,
    dropped by num_out_tokens, add nothing). Without probs every slot is its own row: [T * K, H].
    ``restore_shape`` is accepted and, as in torch_npu, does not change the result.
    Differentiable in permuted_tokens and probs.
    """
    _check_not_padded(padded_mode)
    _check_npu_float("permuted_tokens", permuted_tokens)
    if probs is not None:
        _check_npu_float("probs", probs)
    if restore_shape is not None and not all(isinstance(d, int) for d in restore_shape):
        raise TypeError(f"restore_shape must be a sequence of ints or None, got {restore_shape!r}")
    return moe_unpermute(permuted_tokens, sorted_indices, probs)
