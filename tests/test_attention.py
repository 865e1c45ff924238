"""Local attention with log-sum-exp (the building block of context-parallel attention), every CPU-runnable backend."""

from __future__ import annotations

import pytest
import torch

import mm_kernels
from mm_kernels.ops.attention import attention_bwd, attention_with_lse
from mm_kernels.reference import attention as reference
from tests.helpers import backend_params, relative_error

# Largest error relative to the largest fp64 reference value (Triton's interpreter truncates to bf16).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}




def _inputs(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads_q, dim, generator=gen).to(dtype)
    k = torch.randn(batch, seq_k, heads_kv, dim, generator=gen).to(dtype)
    v = torch.randn(batch, seq_k, heads_kv, dim, generator=gen).to(dtype)
    dout = torch.randn(batch, seq_q, heads_q, dim, generator=gen).to(dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, causal, scale=None):
    """fp64 (out, lse, dq, dk, dv) from torch's math attention on the same (rounded) inputs."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    scores = qt @ kt.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    out = (torch.softmax(scores, -1) @ vt).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), torch.logsumexp(scores, -1).detach(), q.grad, k.grad, v.grad


def _run(backend, q, k, v, dout, causal, scale=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with mm_kernels.use_backend(backend):
        out, lse = attention_with_lse(q, k, v, causal=causal, softmax_scale=scale)
        out.backward(dout)
    return out.detach(), lse, q.grad, k.grad, v.grad


def _assert_matches(actual, expected, dtype):
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.shape == e.shape, name
        tol = TOLERANCE[torch.float64] if name == "lse" and dtype == torch.float64 else TOLERANCE[dtype]
        if name == "lse":
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            tol = max(tol, 1e-5)
        else:
            assert a.dtype == dtype, name
        error = relative_error(a, e)
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


SHAPES = [  # batch, seq_q, seq_k, heads_q, heads_kv, dim
    (2, 19, 19, 4, 2, 8),
    (1, 1, 1, 1, 1, 5),
    (2, 7, 20, 3, 1, 16),
    (1, 21, 9, 2, 2, 12),
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(backend, dtype, causal, shape):
    if backend == "triton" and dtype in (torch.float16, torch.float64) and shape != SHAPES[0]:
        pytest.skip("the interpreter is slow: fp16 and fp64 on one shape")
    q, k, v, dout = _inputs(*shape, dtype)
    _assert_matches(_run(backend, q, k, v, dout, causal), _reference(q, k, v, dout, causal), dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs_and_custom_scale(backend):
    q, k, v, dout = _inputs(2, 12, 12, 4, 2, 8, torch.float32)
    qn, kn, vn = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    qs = torch.cat([q, q], dim=1)[:, ::2]
    assert not qn.is_contiguous() and not qs.is_contiguous()
    _assert_matches(_run(backend, qn, kn, vn, dout, True, 0.3), _reference(q, k, v, dout, True, 0.3), torch.float32)
    _assert_matches(_run(backend, qs, k, v, dout, False), _reference(qs, k, v, dout, False), torch.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_backward_of_a_key_block_uses_the_whole_rows_lse(backend):
    """Ring attention differentiates each key block against the lse of all keys: the blocks' gradients
    must add up to the full gradient."""
    q, k, v, dout = _inputs(2, 10, 16, 4, 2, 8, torch.float64)
    with mm_kernels.use_backend(backend):
        out, lse = attention_with_lse(q, k, v)
        full = attention_bwd(dout, q, k, v, out, lse, False, 8 ** -0.5)
        blocks = [attention_bwd(dout, q, k[:, s], v[:, s], out, lse, False, 8 ** -0.5)
                  for s in (slice(0, 6), slice(6, None))]
    torch.testing.assert_close(blocks[0][0] + blocks[1][0], full[0])
    torch.testing.assert_close(torch.cat([blocks[0][1], blocks[1][1]], dim=1), full[1])
    torch.testing.assert_close(torch.cat([blocks[0][2], blocks[1][2]], dim=1), full[2])


@pytest.mark.parametrize("backend", backend_params())
def test_empty_inputs(backend):
    with mm_kernels.use_backend(backend):
        q, k, v, dout = _inputs(2, 0, 5, 2, 1, 4, torch.float32)
        out, lse, dq, dk, dv = _run(backend, q, k, v, dout, True)
        assert out.shape == (2, 0, 2, 4) and lse.shape == (2, 2, 0)
        assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))
        q, k, v, dout = _inputs(2, 3, 0, 2, 1, 4, torch.float32)
        out, lse, dq, dk, dv = _run(backend, q, k, v, dout, False)
        assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())
        assert torch.equal(dq, torch.zeros_like(q))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_propagates_like_the_reference(backend, where, causal):
    """A NaN in q poisons its row, a NaN in k every row that sees that key, also with fewer than 16 keys
    (the blocks of ring attention), where ATen's CPU kernel returned a finite row. None: no forced backend."""
    q, k, v, _ = _inputs(1, 5, 7, 2, 2, 8, torch.float32)
    {"q": q, "k": k}[where][0, 1, 0, 3] = float("nan")
    with mm_kernels.use_backend(backend):
        out, lse = attention_with_lse(q, k, v, causal=causal)
    ref_out, ref_lse = reference.attention_fwd(q.double(), k.double(), v.double(), causal, 8 ** -0.5)
    assert ref_lse.isnan().any()
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())


def test_bad_inputs_raise_naming_the_argument():
    q = torch.randn(2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"q must have shape \[B, S, H, D\]"):
        attention_with_lse(q[0], q, q)
    with pytest.raises(TypeError, match="one dtype"):
        attention_with_lse(q, q.double(), q)
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        attention_with_lse(q, q.long(), q)
    with pytest.raises(ValueError, match="query heads Hq=4 must be a multiple of the key/value heads Hkv=3"):
        attention_with_lse(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="v must have the shape of k"):
        attention_with_lse(q, q, q[:, :3])
    with pytest.raises(ValueError, match=r"k must have shape \[B=2, Sk, Hkv, D=8\]"):
        attention_with_lse(q, q[..., :4], q[..., :4])


def test_lse_carries_no_gradient():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 4, torch.float32)
    q.requires_grad_()
    out, lse = attention_with_lse(q, k, v)
    assert out.requires_grad and not lse.requires_grad


def test_torch_compile_fullgraph_matches_eager():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attention_with_lse(q, k, v, causal=True)[0] * 2.0

    q, k, v, dout = _inputs(2, 9, 9, 4, 2, 8, torch.float32)
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = [t.clone().requires_grad_() for t in (q, k, v)]
    module = Attend()
    module(*eager).backward(dout)
    out = torch.compile(module, fullgraph=True)(*compiled)
    out.backward(dout)
    torch.testing.assert_close(out, module(*eager))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
