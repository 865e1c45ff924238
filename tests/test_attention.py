"""Fused attention (masks, dropout) and attention with log-sum-exp (the building block of context-parallel
attention), every CPU-runnable backend, against an fp64 oracle written here."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mm_kernels
from mm_kernels.ops.attention import attention_bwd, attention_fwd, attention_with_lse, flash_attention
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


def _reference(q, k, v, dout, causal, scale=None, mask=None, keep=None, dropout_p=0.0):
    """fp64 (out, lse, dq, dk, dv) of softmax attention on the same (rounded) inputs, written out: K/V heads
    repeated, ``mask`` [B, Sq, Sk] (True: hidden), rows that see no key 0, probabilities times ``keep``
    [B, Hq, Sq, Sk] / (1 - dropout_p) when given."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    scores = qt @ kt.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    hidden = torch.zeros(scores.shape[-2:], dtype=torch.bool)
    if causal:
        hidden = ~torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        hidden = hidden | mask.unsqueeze(1)
    scores = scores.masked_fill(hidden, float("-inf"))
    blind = hidden.all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(blind, 0.0), -1).masked_fill(blind, 0.0)
    if keep is not None:
        probs = probs * keep / (1 - dropout_p)
    out = (probs @ vt).transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), torch.logsumexp(scores, -1).detach(), q.grad, k.grad, v.grad


def _run(backend, q, k, v, dout, causal, scale=None, mask=None):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with mm_kernels.use_backend(backend):
        out, lse = attention_with_lse(q, k, v, causal=causal, softmax_scale=scale, mask=mask)
        out.backward(dout)
    return out.detach(), lse, q.grad, k.grad, v.grad


def _assert_matches(actual, expected, dtype):
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual, expected, strict=True):
        assert a.shape == e.shape, name
        tol = TOLERANCE[torch.float64] if name == "lse" and dtype == torch.float64 else TOLERANCE[dtype]
        if name == "lse":
            assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            tol = max(tol, 1e-5)
            blind = e == float("-inf")  # rows that see no key
            assert torch.equal(a == float("-inf"), blind), "lse: -inf on other rows than the reference"
            a, e = a[~blind], e[~blind]
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
        full = attention_bwd(dout, q, k, v, out, lse, None, False, 8 ** -0.5, 0.0, None)
        blocks = [attention_bwd(dout, q, k[:, s], v[:, s], out, lse, None, False, 8 ** -0.5, 0.0, None)
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
    ref_out, ref_lse = reference.attention_fwd(q.double(), k.double(), v.double(), None, causal, 8 ** -0.5, 0.0, None)
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


def _key_padding(batch, seq_q, seq_k, blind_row=False):
    """[B, Sq, Sk] mask: batch row b hides its last 2 b keys, plus random holes; with ``blind_row`` query 1
    of batch row 0 sees no key at all."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([max(seq_k - 2 * b, 1) for b in range(batch)])
    mask = (torch.arange(seq_k) >= lengths[:, None])[:, None, :] | (torch.rand(batch, seq_q, seq_k, generator=gen) < 0.2)
    if blind_row and seq_q > 1:
        mask[0, 1] = True
    return mask


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_matches_fp64_reference(backend, dtype, causal, shape):
    """A padding mask with holes and a query that sees no key (out 0, lse -inf, no gradient)."""
    if backend == "triton" and dtype == torch.float16 and shape != SHAPES[0]:
        pytest.skip("the interpreter is slow: fp16 on one shape")
    q, k, v, dout = _inputs(*shape, dtype)
    mask = _key_padding(shape[0], shape[1], shape[2], blind_row=True)
    result = _run(backend, q, k, v, dout, causal, mask=mask)
    _assert_matches(result, _reference(q, k, v, dout, causal, mask=mask), dtype)
    if shape[1] > 1:
        out, lse, dq = result[:3]
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and bool((lse[0, :, 1] == float("-inf")).all())
        assert torch.equal(dq[0, 1], torch.zeros_like(dq[0, 1]))


@pytest.mark.parametrize("backend", backend_params())
def test_mask_layouts_give_one_answer(backend):
    """Megatron's [B, 1, Sq, Sk], a key-padding [B, 1, Sk] and a shared [Sq, Sk] mask, and a transposed
    (non-contiguous) one, each equal to the same mask spelled out as [B, Sq, Sk]."""
    q, k, v, dout = _inputs(2, 9, 11, 4, 2, 8, torch.float32)
    padding = torch.arange(11) >= torch.tensor([11, 7])[:, None]
    shared = torch.rand(9, 11, generator=torch.Generator().manual_seed(3)) < 0.3
    transposed = torch.rand(2, 11, 9, generator=torch.Generator().manual_seed(4)) < 0.3
    for given, full in ((padding[:, None, None, :], padding[:, None, :].expand(2, 9, 11)),
                        (padding[:, None, :], padding[:, None, :].expand(2, 9, 11)),
                        (shared, shared.expand(2, 9, 11)), (transposed.transpose(1, 2), transposed.transpose(1, 2))):
        _assert_matches(_run(backend, q, k, v, dout, True, mask=given),
                        _reference(q, k, v, dout, True, mask=full.contiguous()), torch.float32)


def _dropout_run(backend, q, k, v, dout, causal, mask, dropout_p, seed):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    with mm_kernels.use_backend(backend):
        out, lse = attention_fwd(q, k, v, mask, causal, q.shape[-1] ** -0.5, dropout_p, seed)
        out.backward(dout)
    return out.detach(), lse, q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_the_reference_keep_mask(backend, dtype, causal):
    """Every backend drops the probabilities of dropout_keep(seed): values and gradients equal the fp64
    oracle given that keep mask (Triton draws it in the kernel, forward and backward)."""
    batch, seq_q, seq_k, heads_q, heads_kv, dim = 2, 19, 23, 4, 2, 8
    q, k, v, dout = _inputs(batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype)
    mask = _key_padding(batch, seq_q, seq_k, blind_row=True)
    seed = torch.tensor([987654321987])
    keep = reference.dropout_keep(seed, 0.3, batch, heads_q, seq_q, seq_k)
    result = _dropout_run(backend, q, k, v, dout, causal, mask, 0.3, seed)
    _assert_matches(result, _reference(q, k, v, dout, causal, mask=mask, keep=keep, dropout_p=0.3), dtype)


def test_dropout_keep_mask_statistics():
    """About 1 - p kept (within 5 binomial standard deviations), one mask per seed, new masks for new seeds,
    and none dropped at p = 0."""
    p, size = 0.25, (4, 8, 64, 64)
    first = reference.dropout_keep(torch.tensor([11]), p, *size)
    count = first.numel()
    assert abs(first.sum().item() - (1 - p) * count) <= 5 * (count * p * (1 - p)) ** 0.5
    assert torch.equal(first, reference.dropout_keep(torch.tensor([11]), p, *size))
    other = reference.dropout_keep(torch.tensor([12]), p, *size)
    assert abs((first == other).float().mean().item() - (p * p + (1 - p) ** 2)) < 0.01
    assert bool(reference.dropout_keep(torch.tensor([11]), 0.0, *size).all())


def test_philox_matches_its_published_test_vector():
    """Philox4x32-10 known-answer vector (Random123): key (0, 0), counter 0 -> 0x6627e8d5 first word."""
    assert reference.philox_uint32(torch.tensor(0), torch.tensor([0])).item() == 0x6627E8D5


@pytest.mark.parametrize("backend", backend_params())
def test_flash_attention_dropout_follows_the_default_generator(backend):
    """The seed comes from the device's default generator: torch.manual_seed repeats a run, the next call
    drops differently, and dropout_p = 0 draws nothing."""
    q, k, v, _ = _inputs(1, 16, 16, 2, 1, 8, torch.float32)
    with mm_kernels.use_backend(backend):
        torch.manual_seed(5)
        first, second = flash_attention(q, k, v, dropout_p=0.5), flash_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(5)
        again = flash_attention(q, k, v, dropout_p=0.5)
        state = torch.get_rng_state()
        plain = flash_attention(q, k, v, causal=True)
        assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(first, again) and not torch.equal(first, second)
    torch.testing.assert_close(plain, _reference(q, k, v, torch.zeros_like(q), True)[0].float())


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return result


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_grouped_query_attention_never_repeats_key_value_heads(backend):
    """No tensor of the repeated K/V shape (Sk keys, Hq heads) is made, forward or backward (Sq != Sk, so
    nothing of q's shape looks like one). The backend's functions are called directly, so the recorder
    sees every operator inside them (a custom operator's insides are hidden from a dispatch mode)."""
    if backend == "cpu" and not mm_kernels.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    kernels = importlib.import_module(f"mm_kernels.{backend}.attention")
    batch, seq_q, seq_k, heads_q, heads_kv, dim = 2, 24, 20, 8, 2, 16
    q, k, v, dout = _inputs(batch, seq_q, seq_k, heads_q, heads_kv, dim, torch.float32)
    scale = dim ** -0.5
    with _Shapes() as recorder:
        out, lse = kernels.attention_fwd(q, k, v, None, True, scale, 0.0, None)
        kernels.attention_bwd(dout, q, k, v, out, lse, None, True, scale, 0.0, None)
    assert (batch, seq_q, heads_q, dim) in recorder.shapes  # the recorder sees the kernels' tensors
    assert not recorder.shapes & {(batch, seq_k, heads_q, dim), (batch, heads_q, seq_k, dim)}


def test_bad_mask_and_dropout_raise_naming_the_argument():
    q = torch.randn(2, 4, 4, 8)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        flash_attention(q, q, q, mask=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"mask must broadcast to \[B, Sq, Sk\] = \[2, 4, 4\], got \(3, 4, 4\)"):
        flash_attention(q, q, q, mask=torch.zeros(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(2, 4, 4, 4\)"):
        flash_attention(q, q, q, mask=torch.zeros(2, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        flash_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        flash_attention(q, q, q, dropout_p=-0.1)


def test_torch_compile_fullgraph_with_mask_and_dropout():
    """With a mask, compiled equals eager; with dropout too it compiles without a graph break (the seed is
    then drawn by the compiled graph's generator, so the dropped entries differ from eager's)."""
    mask = _key_padding(2, 9, 9)

    def attend(q, k, v, dropout_p):
        return flash_attention(q, k, v, causal=True, mask=mask, dropout_p=dropout_p) * 2.0

    q, k, v, dout = _inputs(2, 9, 9, 4, 2, 8, torch.float32)
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = attend(*eager, 0.0)
    expected.backward(dout)
    out = torch.compile(attend, fullgraph=True)(*compiled, 0.0)
    out.backward(dout)
    torch.testing.assert_close(out, expected)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    dropped = torch.compile(attend, fullgraph=True)(*compiled, 0.5)
    dropped.backward(dout)
    assert not torch.allclose(dropped, expected) and bool(dropped.isfinite().all())
