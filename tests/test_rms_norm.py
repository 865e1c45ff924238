"""RMSNorm: every backend that runs on CPU against an fp64 oracle (values, dx, dweight), the
rounding of each casting mode, edge shapes, bad input, determinism, torch.compile and FusedRMSNorm."""

from __future__ import annotations

import math

import pytest
import torch

import mm_kernels
from mm_kernels.nn import FusedRMSNorm
from mm_kernels.ops import rms_norm as rms_norm_ops
from mm_kernels.reference import rms_norm as reference
from tests.helpers import DTYPES, assert_close, backend_params, cpu_backends, device_for

EPS = 1e-6
CASTINGS = ("llama", "gemma", "none")


BACKENDS = backend_params()


def _inputs(shape, dtype, weight_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen)).to(weight_dtype or dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    return x, weight, dy


def _oracle(x, weight, dy, casting="llama", offset=0.0):
    """fp64 values and gradients of the reference formula: (y, rstd, dx, dweight or None)."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.detach().double().requires_grad_()
    y, rstd = reference.rms_norm_fwd(x64, w64, EPS, casting, offset)
    grads = torch.autograd.grad(y, [t for t in (x64, w64) if t is not None], dy.double())
    return y.detach(), rstd.detach(), grads[0], (grads[1] if w64 is not None else None)


def _leaf(t, backend):
    """A fresh leaf copy of ``t`` (strides kept) on the device ``backend`` runs on."""
    return None if t is None else t.detach().to(device_for(backend), copy=True).requires_grad_()


def _cpu(*tensors):
    return tuple(None if t is None else t.detach().cpu() for t in tensors)


def _run(backend, x, weight, dy, casting="llama", offset=0.0):
    """Forward and backward through the public API on ``backend``: (y, rstd, dx, dweight or None) on CPU."""
    x, weight = _leaf(x, backend), _leaf(weight, backend)
    with mm_kernels.use_backend(backend):
        y, rstd = mm_kernels.rms_norm_with_rstd(x, weight, EPS, casting, offset)
        grads = torch.autograd.grad(y, [t for t in (x, weight) if t is not None], dy.to(x.device))
    return _cpu(y, rstd, grads[0], grads[1] if weight is not None else None)


def _check_against_oracle(got, expected, dtype, rows, weight_dtype=None):
    y, rstd, dx, dweight = got
    y_ref, rstd_ref, dx_ref, dweight_ref = expected
    assert y.dtype == dtype and dx.dtype == dtype and rstd.dtype == torch.float32
    assert_close(y, y_ref, dtype, name="y")
    assert_close(rstd, rstd_ref, torch.float32, name="rstd")
    assert_close(dx, dx_ref, dtype, name="dx")
    if dweight_ref is not None:
        assert dweight.dtype == (weight_dtype or dtype)
        assert_close(dweight, dweight_ref, weight_dtype or dtype, scale=math.sqrt(max(rows, 1)), name="dweight")
    else:
        assert dweight is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("casting", CASTINGS)
def test_matches_fp64_oracle(backend, dtype, casting):
    x, weight, dy = _inputs((6, 123), dtype)
    offset = 0.5 if casting == "gemma" else 0.0
    got = _run(backend, x, weight, dy, casting, offset)
    _check_against_oracle(got, _oracle(x, weight, dy, casting, offset), dtype, rows=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64), (7, 1), (2, 3, 123), (64,)], ids=str)
def test_odd_shapes(backend, shape):
    x, weight, dy = _inputs(shape, torch.float32)
    got = _run(backend, x, weight, dy)
    assert got[0].shape == x.shape and got[1].shape == x.shape[:-1]
    _check_against_oracle(got, _oracle(x, weight, dy), torch.float32, rows=x.numel() // shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    x, weight, dy = _inputs((0, 32), torch.bfloat16)
    y, rstd, dx, dweight = _run(backend, x, weight, dy)
    assert y.shape == (0, 32) and rstd.shape == (0,) and dx.shape == (0, 32)
    assert dweight.shape == (32,) and dweight.dtype == torch.bfloat16 and not dweight.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", CASTINGS)
def test_without_weight(backend, casting):
    x, _, dy = _inputs((5, 40), torch.bfloat16)
    got = _run(backend, x, None, dy, casting, offset=1.0)
    _check_against_oracle(got, _oracle(x, None, dy, casting), torch.bfloat16, rows=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_of_another_dtype(backend):
    x, weight, dy = _inputs((5, 48), torch.bfloat16, weight_dtype=torch.float32)
    got = _run(backend, x, weight, dy, "gemma", 1.0)
    _check_against_oracle(got, _oracle(x, weight, dy, "gemma", 1.0), torch.bfloat16, rows=5,
                          weight_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    _, weight, dy = _inputs((12, 40), torch.float16)
    x = _inputs((40, 12), torch.float16, seed=3)[0].t()  # [12, 40], column-major
    assert not x.is_contiguous()
    _check_against_oracle(_run(backend, x, weight, dy), _oracle(x, weight, dy), torch.float16, rows=12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(backend, dtype):
    x, weight, dy = _inputs((5, 96), dtype)
    residual = _inputs((5, 96), dtype, seed=1)[0]
    xs, rs, ws = (_leaf(t, backend) for t in (x, residual, weight))
    with mm_kernels.use_backend(backend):
        y, rstd, summed = mm_kernels.add_rms_norm(xs, rs, ws, EPS)
        dy_dev = dy.to(xs.device)
        y, rstd, summed, dx, dres, dweight = _cpu(
            y, rstd, summed, *torch.autograd.grad((y, summed), (xs, rs, ws), (dy_dev, dy_dev)))
    assert summed.dtype == dtype
    # The Triton interpreter truncates fp32 -> bf16 instead of rounding: one bf16 step.
    one_step = torch.finfo(dtype).eps if backend == "triton" and dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(summed, x + residual, atol=0, rtol=one_step)
    s64 = summed.detach().double().requires_grad_()  # the oracle normalises the sum the kernel returned
    w64 = weight.double().requires_grad_()
    y_ref, rstd_ref = reference.rms_norm_fwd(s64, w64, EPS, "llama", 0.0)
    ds_ref, dw_ref = torch.autograd.grad((y_ref, s64), (s64, w64), (dy.double(), dy.double()))
    assert_close(y, y_ref, dtype, name="y")
    assert_close(rstd, rstd_ref, torch.float32, name="rstd")
    assert_close(dx, ds_ref, dtype, name="dx")
    assert_close(dres, ds_ref, dtype, name="dresidual")
    assert_close(dweight, dw_ref, dtype, scale=math.sqrt(5), name="dweight")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting", CASTINGS)
def test_cpu_rounds_like_the_reference(dtype, casting):
    """The casting modes differ by where results are rounded to x.dtype; the C++ kernels round at the
    same places as the reference, so at most a few elements (sums in another order) differ by one step."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    x, weight, dy = _inputs((64, 123), dtype)
    results = {}
    for backend in ("reference", "cpu"):
        with mm_kernels.use_backend(backend):
            y, rstd = rms_norm_ops.rms_norm_fwd(x, weight, EPS, casting, 0.5)
            dx, dweight = rms_norm_ops.rms_norm_bwd(dy, x, weight, rstd, EPS, casting, 0.5)
        results[backend] = (y, dx, dweight)
    one_step = torch.finfo(dtype).eps
    for name, ours, ref in zip(("y", "dx", "dweight"), results["cpu"], results["reference"], strict=True):
        torch.testing.assert_close(ours, ref, atol=one_step * 1e-3, rtol=one_step, msg=name)
        assert (ours != ref).float().mean().item() < 0.01, name


def test_fp64_runs_the_reference_on_every_backend():
    x, weight, dy = _inputs((4, 33), torch.float64)
    expected = _run("reference", x, weight, dy, "gemma", 1.0)
    for backend in cpu_backends():
        got = _run(backend, x, weight, dy, "gemma", 1.0)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("hidden", [4096, 4097], ids=["aligned", "unaligned"])
def test_cpu_outputs_larger_than_the_caches(hidden):
    """Outputs of 8 MiB and more are written with non-temporal stores from an L1 buffer (rows of an odd
    width start unaligned): the same values as the cached path's oracle, for fwd, bwd and the residual add."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    rows = 1024
    x, weight, dy = _inputs((rows, hidden), torch.bfloat16)
    assert x.nbytes >= 8 << 20
    _check_against_oracle(_run("cpu", x, weight, dy), _oracle(x, weight, dy), torch.bfloat16, rows=rows)
    residual = _inputs((rows, hidden), torch.bfloat16, seed=1)[0]
    with mm_kernels.use_backend("cpu"):
        y, _, summed = mm_kernels.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(summed, x + residual)
    assert_close(y, _oracle(summed, weight, dy)[0], torch.bfloat16, name="y")


def test_weight_gradient_bits_do_not_depend_on_thread_count():
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    x, weight, dy = _inputs((1000, 96), torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", x, weight, dy)
        torch.set_num_threads(2)
        two = _run("cpu", x, weight, dy)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.triton
def test_triton_rows_longer_than_one_block(monkeypatch):
    """H above MAX_BLOCK walks the row in chunks and keeps the weight-gradient partials in memory."""
    import mm_kernels.triton.rms_norm as triton_rms_norm

    monkeypatch.setattr(triton_rms_norm, "MAX_BLOCK", 32)
    x, weight, dy = _inputs((3, 100), torch.float32)
    _check_against_oracle(_run("triton", x, weight, dy), _oracle(x, weight, dy), torch.float32, rows=3)
    residual = _inputs((3, 100), torch.float32, seed=2)[0]
    with mm_kernels.use_backend("triton"):
        y, _, summed = _cpu(*mm_kernels.add_rms_norm(*(_leaf(t, "triton") for t in (x, residual, weight)), EPS))
    assert_close(y, _oracle(summed, weight, dy)[0], torch.float32, name="y")


@pytest.mark.triton
def test_triton_backward_programs_with_several_row_tiles():
    """More rows than backward programs x rows per tile: each program loops over tiles of its rows."""
    x, weight, dy = _inputs((1000, 2048), torch.bfloat16)
    _check_against_oracle(_run("triton", x, weight, dy), _oracle(x, weight, dy), torch.bfloat16, rows=1000)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, w: mm_kernels.rms_norm(x, w[:-1]), ValueError, r"weight must have shape \[H\] = \[8\]"),
        (lambda x, w: mm_kernels.rms_norm(x.to(torch.int32), None), TypeError, "x must be a floating-point"),
        (lambda x, w: mm_kernels.rms_norm(x, w.to(torch.int64)), TypeError, "weight must be a floating-point"),
        (lambda x, w: mm_kernels.rms_norm(x, [1.0] * 8), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w: mm_kernels.rms_norm(x[:, :0], None), ValueError, "H >= 1"),
        (lambda x, w: mm_kernels.rms_norm(x, w, casting="mistral"), ValueError, "casting must be one of"),
        (lambda x, w: mm_kernels.rms_norm(x, w, eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda x, w: mm_kernels.add_rms_norm(x, x[:2], w), ValueError, "residual must match x"),
        (lambda x, w: FusedRMSNorm(8)(x[:, :4]), ValueError, r"x must have shape \[\.\.\., 8\]"),
        (lambda x, w: FusedRMSNorm(8, casting="fp8"), ValueError, "casting must be one of"),
    ],
    ids=["weight-length", "int-x", "int-weight", "list-weight", "empty-H", "casting", "eps", "residual",
         "module-shape", "module-casting"],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    x, weight, _ = _inputs((3, 8), torch.float32)
    with pytest.raises(error, match=match):
        call(x, weight)


class _Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.norm = FusedRMSNorm(hidden, eps=EPS)

    def forward(self, x):
        h, _, summed = mm_kernels.add_rms_norm(x, self.proj(x), self.norm.weight, EPS)
        return self.norm(h + summed).sum(dim=-1)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _Block(32)
    x = torch.randn(4, 5, 32, requires_grad=True)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.sum(), [x, *model.parameters()])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_fused_rms_norm_state_dict_round_trip():
    torch.manual_seed(0)
    plain = torch.nn.RMSNorm(48, eps=EPS)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
    fused = FusedRMSNorm(48, eps=EPS)
    fused.load_state_dict(plain.state_dict())
    back = torch.nn.RMSNorm(48, eps=EPS)
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back.weight, plain.weight, atol=0, rtol=0)
    x = torch.randn(3, 7, 48)
    assert_close(fused(x), plain(x).double(), torch.float32)


def test_fused_rms_norm_like_torch_for_defaults_and_several_dims():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 24)
    for args in ((24,), ((2, 24),)):
        plain, fused = torch.nn.RMSNorm(*args), FusedRMSNorm(*args)
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
        fused.load_state_dict(plain.state_dict())
        assert_close(fused(x), plain(x).double(), torch.float32)
    no_affine = FusedRMSNorm(24, elementwise_affine=False, casting="gemma", offset=1.0)
    assert no_affine.weight is None and "casting='gemma'" in repr(no_affine)
    assert_close(no_affine(x), torch.nn.RMSNorm(24, elementwise_affine=False)(x).double(), torch.float32)
