"""SwiGLU: every backend against the fp64 reference (values and gradients), dims, odd and empty
shapes, non-contiguous input, bad input, torch.compile, and SwiGLUMLP against a plain Llama MLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mm_kernels
from mm_kernels.nn import SwiGLUMLP
from mm_kernels.nn.mlp import fuse_gate_up_state_dict, split_gate_up_state_dict
from mm_kernels.reference import swiglu as reference
from tests.helpers import DTYPES, assert_close, backend_params, cpu_backends, tolerance

BACKENDS = backend_params()

# (shape of x, dim): one row, 123 output columns, odd outer sizes, every dim of a 3-d tensor.
CASES = [((1, 2), -1), ((5, 246), -1), ((3, 10, 7), 1), ((3, 10, 7), -2), ((6, 5, 3), 0), ((2, 3, 8), 2)]


def _oracle(x: torch.Tensor, dy: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx) of the reference in fp64."""
    return reference.swiglu_fwd(x.double(), dim), reference.swiglu_bwd(dy.double(), x.double(), dim)


def _run(x: torch.Tensor, dy: torch.Tensor, dim: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx) of mm_kernels.swiglu on ``backend`` through autograd."""
    x = x.detach().requires_grad_()
    with mm_kernels.use_backend(backend):
        y = mm_kernels.swiglu(x, dim=dim)
        y.backward(dy)
    return y, x.grad


def test_reference_backward_equals_autograd_in_fp64():
    """The oracle's hand-written backward agrees with autograd through F.silu."""
    x = (3 * torch.randn(6, 5, 8, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(6, 5, 4, dtype=torch.float64)
    a, b = x.chunk(2, -1)
    (F.silu(a) * b).backward(dy)
    torch.testing.assert_close(reference.swiglu_bwd(dy, x.detach(), 2), x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
def test_values_and_gradients_match_fp64_reference(backend, dtype, shape, dim):
    x = (3 * torch.randn(shape)).to(dtype)
    out_shape = list(shape)
    out_shape[dim] //= 2
    dy = torch.randn(out_shape).to(dtype)
    y, dx = _run(x, dy, dim, backend)
    y_ref, dx_ref = _oracle(x, dy, dim)
    assert y.dtype == dtype and y.shape == y_ref.shape and y.is_contiguous()
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(y, y_ref, dtype, name="y")
    assert_close(dx, dx_ref, dtype, name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pair_matches_fp64_reference(backend, dtype):
    gate, up, dy = (torch.randn(7, 123) * 3).to(dtype), torch.randn(7, 123).to(dtype), torch.randn(7, 123).to(dtype)
    gate.requires_grad_()
    up.requires_grad_()
    with mm_kernels.use_backend(backend):
        y = mm_kernels.swiglu_pair(gate, up)
        y.backward(dy)
    assert_close(y, reference.swiglu_pair_fwd(gate.double(), up.double()), dtype, name="y")
    dgate_ref, dup_ref = reference.swiglu_pair_bwd(dy.double(), gate.double(), up.double())
    assert_close(gate.grad, dgate_ref, dtype, name="dgate")
    assert_close(up.grad, dup_ref, dtype, name="dup")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_equals_halves_form(backend):
    x = torch.randn(4, 2, 33)
    with mm_kernels.use_backend(backend):
        torch.testing.assert_close(mm_kernels.swiglu_pair(x[:, 0], x[:, 1]), mm_kernels.swiglu(x, dim=1).squeeze(1),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_input_is_computed_in_fp64(backend):
    x, dy = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    y, dx = _run(x, dy, -1, backend)
    y_ref, dx_ref = _oracle(x, dy, -1)
    assert_close(y, y_ref, torch.float64, name="y")
    assert_close(dx, dx_ref, torch.float64, name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitudes_and_nan(backend, dtype):
    """silu saturates correctly far from 0 (exp range limits) and NaN propagates."""
    gate = torch.tensor([-1e4, -300.0, -90.0, -20.0, 0.0, 20.0, 90.0, 300.0, 1e4, float("nan")])
    x = torch.cat((gate, torch.full_like(gate, 1.5))).to(dtype)
    with mm_kernels.use_backend(backend):
        y = mm_kernels.swiglu(x)
    assert torch.isnan(y[-1]) and not torch.isnan(y[:-1]).any()
    assert_close(y[:-1], reference.swiglu_fwd(x.double(), -1)[:-1], dtype, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_and_nan_gates_match_the_reference(backend, dtype):
    """silu(-inf) = -inf * sigmoid(-inf) = -inf * 0 is NaN in torch; so is the gradient at +-inf. None: no
    backend forced (the device's kernel)."""
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), -100.0, 100.0, 0.0])
    x = torch.cat((special, torch.full_like(special, 2.0))).to(dtype).requires_grad_()
    dy = torch.ones(6, dtype=dtype)
    with mm_kernels.use_backend(backend):
        y = mm_kernels.swiglu(x)
        (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, dx_ref = _oracle(x.detach(), dy, -1)
    torch.testing.assert_close(y.double(), y_ref, equal_nan=True, **tolerance(dtype))
    torch.testing.assert_close(dx.double(), dx_ref, equal_nan=True, **tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = torch.randn(10, 2 * 37, 3)
    transposed = base.transpose(0, 1)  # [74, 10, 3], split along dim 0
    strided = base[::2, :, 1]  # [5, 74], split along the last dim
    for x, dim in ((transposed, 0), (strided, -1)):
        assert not x.is_contiguous()
        dy = torch.randn(reference.swiglu_fwd(x, dim).shape)
        y, dx = _run(x, dy, dim, backend)
        y_ref, dx_ref = _oracle(x, dy, dim)
        assert_close(y, y_ref, torch.float32, name="y")
        assert_close(dx, dx_ref, torch.float32, name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dim", [((0, 8), -1), ((3, 0), -1), ((0, 4), 0), ((2, 0, 6), 2)], ids=str)
def test_empty_input(backend, shape, dim):
    x = torch.randn(shape)
    out_shape = list(shape)
    out_shape[dim] //= 2
    y, dx = _run(x, torch.randn(out_shape), dim, backend)
    assert y.shape == tuple(out_shape) and dx.shape == shape


@pytest.mark.parametrize("width", [8192, 8194], ids=["aligned", "unaligned"])
def test_cpu_outputs_larger_than_the_caches(width):
    """Outputs of 8 MiB and more are written with non-temporal stores from an L1 buffer (an odd half
    width starts rows unaligned): values and gradients as the oracle's, packed and pair forms."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    x, dy = torch.randn(1024, width).to(torch.bfloat16), torch.randn(1024, width // 2).to(torch.bfloat16)
    assert dy.nbytes >= 8 << 20
    y, dx = _run(x, dy, -1, "cpu")
    y_ref, dx_ref = _oracle(x, dy, -1)
    assert_close(y, y_ref, torch.bfloat16, name="y")
    assert_close(dx, dx_ref, torch.bfloat16, name="dx")
    gate, up = x.chunk(2, dim=-1)
    gate, up = gate.contiguous().requires_grad_(), up.contiguous().requires_grad_()
    with mm_kernels.use_backend("cpu"):
        y_pair = mm_kernels.swiglu_pair(gate, up)
        y_pair.backward(dy)
    assert torch.equal(y_pair, y)
    assert torch.equal(torch.cat((gate.grad, up.grad), -1), dx)


def test_cpu_kernel_is_independent_of_thread_count():
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    x, dy = torch.randn(64, 8192, dtype=torch.bfloat16), torch.randn(64, 4096, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_run(x, dy, -1, "cpu"))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)


def test_backward_keeps_only_the_input():
    saved = []
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mm_kernels.swiglu(x)
    assert len(saved) == 1 and saved[0] is x


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: mm_kernels.swiglu(torch.randn(4, 7)), ValueError, r"x.size\(1\) must be even.*dim 1"),
        (lambda: mm_kernels.swiglu(torch.randn(5, 4), dim=0), ValueError, r"x.size\(0\) must be even"),
        (lambda: mm_kernels.swiglu(torch.randn(4, 6), dim=2), ValueError, r"dim must be in \[-2, 2\)"),
        (lambda: mm_kernels.swiglu(torch.randn(4, 6), dim=1.0), TypeError, "dim must be an int"),
        (lambda: mm_kernels.swiglu(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: mm_kernels.swiglu(torch.ones(4, 6, dtype=torch.int32)), TypeError, "x must be a floating-point"),
        (lambda: mm_kernels.swiglu([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: mm_kernels.swiglu_pair(torch.randn(3, 4), torch.randn(3, 5)), ValueError, "up must match gate"),
        (lambda: mm_kernels.swiglu_pair(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)), ValueError,
         "up must match gate"),
        (lambda: mm_kernels.swiglu_pair(torch.randn(3, 4), None), TypeError, "up must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_cpu_operator_checks_its_inputs():
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    ops = torch.ops.mm_kernels_cpu
    with pytest.raises(RuntimeError, match="must be even"):
        ops.swiglu_fwd(torch.randn(3, 5), -1)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ops.swiglu_fwd(torch.randn(3, 4, dtype=torch.float64), -1)
    with pytest.raises(RuntimeError, match="dy must have shape"):
        ops.swiglu_bwd(torch.randn(3, 3), torch.randn(3, 4), -1)
    with pytest.raises(RuntimeError, match="dy must have the dtype of x"):
        ops.swiglu_bwd(torch.randn(3, 2, dtype=torch.bfloat16), torch.randn(3, 4), -1)
    with pytest.raises(RuntimeError, match="up must have shape"):
        ops.swiglu_pair_fwd(torch.randn(3, 4), torch.randn(4, 3))


class _GatedBlock(nn.Module):
    def forward(self, x):
        return mm_kernels.swiglu(x, dim=-1) + mm_kernels.swiglu_pair(*x.chunk(2, dim=-1))


def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(4, 2, 24)
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    module = _GatedBlock()
    eager = module(eager_x)
    eager.sum().backward()
    compiled = torch.compile(module, fullgraph=True)(compiled_x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


class _LlamaMLP(nn.Module):
    """The Hugging Face Llama MLP, written out: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden: int, ffn_hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.up_proj = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_equals_llama_mlp(bias):
    llama, fused = _LlamaMLP(16, 40, bias), SwiGLUMLP(16, 40, bias=bias)
    fused.load_state_dict(llama.state_dict())
    x = torch.randn(2, 5, 16)
    y_llama, y_fused = llama(x), fused(x)
    torch.testing.assert_close(y_fused, y_llama)
    y_llama.square().sum().backward()
    y_fused.square().sum().backward()
    torch.testing.assert_close(fused.gate_up_proj.weight.grad,
                               torch.cat((llama.gate_proj.weight.grad, llama.up_proj.weight.grad)))
    torch.testing.assert_close(fused.down_proj.weight.grad, llama.down_proj.weight.grad)
    if bias:
        torch.testing.assert_close(fused.gate_up_proj.bias.grad,
                                   torch.cat((llama.gate_proj.bias.grad, llama.up_proj.bias.grad)))


def test_state_dict_conversion_round_trips_with_prefix():
    llama = nn.Sequential(_LlamaMLP(8, 12, bias=True))
    original = llama.state_dict()
    fused = fuse_gate_up_state_dict(original, prefix="0.")
    assert set(fused) == {"0.gate_up_proj.weight", "0.gate_up_proj.bias", "0.down_proj.weight", "0.down_proj.bias"}
    assert fused["0.gate_up_proj.weight"].shape == (24, 8)
    model = nn.Sequential(SwiGLUMLP(8, 12, bias=True))
    model.load_state_dict(fused)
    model.load_state_dict(original)  # the Llama layout loads directly too
    back = split_gate_up_state_dict(model.state_dict(), prefix="0.")
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_swiglu_mlp_rejects_bad_sizes():
    with pytest.raises(ValueError, match="ffn_hidden must be >= 1"):
        SwiGLUMLP(8, 0)
