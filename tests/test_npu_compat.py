"""mm_kernels.npu_compat against torch_npu's schemas and semantics: signatures, keyword and positional
calls, output shapes and dtypes, the kernels' rounding, num_out_tokens / probs=None semantics, gradients,
and the errors for what torch_npu rejects."""

from __future__ import annotations

import inspect

import pytest
import torch

from mm_kernels import npu_compat
from tests.helpers import DTYPES, assert_close

# torch_npu's operator schemas (op-plugin op_plugin_functions.yaml); torch_npu.<name> is torch.ops.npu.<name>.
SCHEMAS = {
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_rms_norm_backward": "npu_rms_norm_backward(Tensor dy, Tensor self, Tensor gamma, Tensor rstd) -> (Tensor, Tensor)",
    "npu_add_rms_norm": "npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
    "npu_moe_token_permute": "npu_moe_token_permute(Tensor tokens, Tensor indices, int? num_out_tokens=None, "
                             "bool padded_mode=False) -> (Tensor, Tensor)",
    "npu_moe_token_unpermute": "npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, "
                               "Tensor? probs=None, bool padded_mode=False, int[]? restore_shape=None) -> Tensor",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_signature_matches_torch_npu_schema(name):
    schema = torch._C.parse_schema(f"npu::{SCHEMAS[name]}")
    params = list(inspect.signature(getattr(npu_compat, name)).parameters.values())
    assert [p.name for p in params] == [a.name for a in schema.arguments]
    for param, arg in zip(params, schema.arguments, strict=True):
        assert param.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
        expected = inspect.Parameter.empty if not arg.has_default_value() else arg.default_value
        assert param.default == expected, f"{name}({param.name}=...)"
    assert sorted(npu_compat.__all__) == sorted(SCHEMAS)


def _ulp_close(actual, expected, dtype):
    """fp16/bf16: equal but for one unit in the last place on a few elements; fp32: within a few ulps."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)
        return
    diff = (actual.double() - expected.double()).abs()
    ulp = torch.finfo(dtype).eps * expected.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool((diff <= ulp).all()), f"max diff {diff.max().item()}"
    assert (actual == expected).double().mean().item() > 0.99


def _npu_rms_golden(x, gamma, eps):
    """The Ascend kernel's arithmetic: fp32 x * rstd * gamma, one rounding; rstd of the trailing gamma dims."""
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


@pytest.mark.parametrize("x_dtype, gamma_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                  (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32)])
@pytest.mark.parametrize("x_shape, gamma_shape, rstd_shape", [
    ((24, 1, 128), (128,), (24, 1, 1)),
    ((2, 3, 4, 8), (4, 8), (2, 3, 1, 1)),
    ((1, 123), (123,), (1, 1)),
    ((0, 7), (7,), (0, 1)),
])
def test_rms_norm_values_shapes_and_one_rounding(x_dtype, gamma_dtype, x_shape, gamma_shape, rstd_shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(x_dtype)
    gamma = (1 + torch.randn(gamma_shape, generator=generator)).to(gamma_dtype)
    y, rstd = npu_compat.npu_rms_norm(x, gamma, epsilon=1e-5)
    assert y.shape == x.shape and y.dtype == x_dtype
    assert rstd.shape == rstd_shape and rstd.dtype == torch.float32
    expected_y, expected_rstd = _npu_rms_golden(x, gamma, 1e-5)
    torch.testing.assert_close(rstd, expected_rstd, atol=0, rtol=3e-7)
    if x.numel():
        _ulp_close(y, expected_y, x_dtype)


def test_rms_norm_rounds_once_not_twice():
    """bf16 x with fp32 gamma: round(x * rstd * gamma), not round(round(x * rstd) * gamma) as HF Llama does."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=generator).bfloat16()
    gamma = 1 + torch.rand(256, generator=generator)
    y, _ = npu_compat.npu_rms_norm(x, gamma)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    twice = (normed.bfloat16().float() * gamma).bfloat16()
    assert (y != twice).double().mean().item() > 0.05
    _ulp_close(y, (normed * gamma).bfloat16(), torch.bfloat16)


def test_rms_norm_call_forms():
    x, gamma = torch.randn(3, 16), torch.rand(16) + 0.5
    reference = npu_compat.npu_rms_norm(x, gamma, 1e-5)
    for result in (npu_compat.npu_rms_norm(x, gamma, epsilon=1e-5),
                   npu_compat.npu_rms_norm(self=x, gamma=gamma, epsilon=1e-5)):
        for got, want in zip(result, reference, strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    default = npu_compat.npu_rms_norm(x, gamma)[0]
    torch.testing.assert_close(default, _npu_rms_golden(x, gamma, 1e-6)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gradients_and_backward(dtype):
    generator = torch.Generator().manual_seed(2)
    x64 = torch.randn(5, 3, 32, generator=generator, dtype=torch.float64)
    g64 = torch.rand(3, 32, generator=generator, dtype=torch.float64) + 0.5
    dy64 = torch.randn(5, 3, 32, generator=generator, dtype=torch.float64)
    x, gamma = x64.to(dtype).requires_grad_(), g64.to(dtype).requires_grad_()
    y, rstd = npu_compat.npu_rms_norm(x, gamma)
    assert not rstd.requires_grad
    y.backward(dy64.to(dtype))
    xr, gr = x64.detach().to(dtype).double().requires_grad_(), g64.to(dtype).double().requires_grad_()
    rr = torch.rsqrt(xr.pow(2).mean(dim=(1, 2), keepdim=True) + 1e-6)
    (xr * rr * gr).backward(dy64.to(dtype).double())
    assert gamma.grad.dtype == dtype
    assert_close(x.grad, xr.grad, dtype, name="dx")
    assert_close(gamma.grad, gr.grad, dtype, scale=5 ** 0.5, name="dgamma")
    dx, dgamma = npu_compat.npu_rms_norm_backward(dy64.to(dtype), x.detach(), gamma.detach(), rstd)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dgamma.dtype == torch.float32 and dgamma.shape == gamma.shape
    torch.testing.assert_close(dx, x.grad)
    assert_close(dgamma, gr.grad, dtype, scale=5 ** 0.5, name="dgamma (backward)")


@pytest.mark.parametrize("call, error, match", [
    (lambda: npu_compat.npu_rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)),
     TypeError, "self must be float16, bfloat16 or float32"),
    (lambda: npu_compat.npu_rms_norm(torch.randn(2, 8), torch.ones(8).bfloat16()), TypeError, "gamma must be"),
    (lambda: npu_compat.npu_rms_norm(torch.randn(2, 8).half(), torch.ones(8).bfloat16()), TypeError, "float32"),
    (lambda: npu_compat.npu_rms_norm(torch.randn(2, 8), torch.ones(4)), ValueError, "trailing dims"),
    (lambda: npu_compat.npu_rms_norm(torch.randn(8), torch.ones(1, 8)), ValueError, "trailing dims"),
    (lambda: npu_compat.npu_add_rms_norm(torch.randn(2, 8).half(), torch.randn(2, 8).half(), torch.ones(8)),
     TypeError, "gamma must be torch.float16"),
    (lambda: npu_compat.npu_add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8)), ValueError, "x2"),
    (lambda: npu_compat.npu_rms_norm_backward(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), torch.ones(3, 1)),
     ValueError, "rstd"),
    (lambda: npu_compat.npu_swiglu(torch.randn(2, 7)), ValueError, "even"),
    (lambda: npu_compat.npu_swiglu(torch.randn(2, 8, dtype=torch.float64)), TypeError, "float16, bfloat16"),
])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_follows_the_a2_kernel(dtype):
    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(6, 2, 40, generator=generator).to(dtype)
    x2 = torch.randn(6, 2, 40, generator=generator).to(dtype)
    gamma = (torch.rand(40, generator=generator) + 0.5).to(dtype)
    y, rstd, x = npu_compat.npu_add_rms_norm(x1, x2, gamma, epsilon=1e-5)
    assert rstd.shape == (6, 2, 1) and rstd.dtype == torch.float32
    summed = (x1.float() + x2.float()).to(dtype)
    torch.testing.assert_close(x, summed, atol=0, rtol=0)
    xf = summed.float()
    expected_rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rstd, expected_rstd, atol=0, rtol=3e-7)
    _ulp_close(y, ((xf * expected_rstd).to(dtype).float() * gamma.float()).to(dtype), dtype)
    positional = npu_compat.npu_add_rms_norm(x1, x2, gamma, 1e-5)
    keywords = npu_compat.npu_add_rms_norm(x1=x1, x2=x2, gamma=gamma, epsilon=1e-5)
    for a, b in zip(positional, keywords, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_add_rms_norm_is_differentiable():
    x1, x2 = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    gamma = torch.rand(16, requires_grad=True)
    y, _, x = npu_compat.npu_add_rms_norm(x1, x2, gamma)
    (y.sum() + x.sum()).backward()
    r1, r2, rg = (t.detach().clone().requires_grad_() for t in (x1, x2, gamma))
    s = r1 + r2
    ((s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * rg).sum() + s.sum()).backward()
    for got, want in ((x1.grad, r1.grad), (x2.grad, r2.grad), (gamma.grad, rg.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, dim", [((4, 246), -1), ((2, 32, 6, 6), -1), ((6, 5), 0), ((3, 8, 5), 1)])
def test_swiglu(dtype, shape, dim):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    y = npu_compat.npu_swiglu(x, dim=dim)
    a, b = x.detach().double().chunk(2, dim)
    expected = torch.nn.functional.silu(a) * b
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close(y, expected, dtype)
    assert torch.equal(npu_compat.npu_swiglu(x, dim), y) and torch.equal(npu_compat.npu_swiglu(self=x, dim=dim), y)
    if dim == -1:
        assert torch.equal(npu_compat.npu_swiglu(x), y)
    y.backward(torch.ones_like(y))
    xr = x.detach().double().requires_grad_()
    a, b = xr.chunk(2, dim)
    (torch.nn.functional.silu(a) * b).backward(torch.ones_like(expected))
    assert_close(x.grad, xr.grad, dtype)


# torch_npu's documented example: 4 tokens, top-2 routing over 5 experts.
TOKENS = torch.arange(1.0, 5.0).unsqueeze(1).repeat(1, 3)
INDICES = torch.tensor([[0, 4], [4, 3], [4, 2], [1, 1]])
# stable argsort of the flat indices gives the slots in expert order [0, 6, 7, 5, 3, 1, 2, 4];
# sorted_indices is its inverse: the output row of each slot.
SORTED = [0, 5, 6, 4, 7, 3, 1, 2]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_permute_example(index_dtype):
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(TOKENS, INDICES.to(index_dtype))
    assert sorted_indices.dtype == torch.int32 and sorted_indices.tolist() == SORTED
    assert permuted[:, 0].tolist() == [1, 4, 4, 3, 2, 1, 2, 3]
    for slot, row in enumerate(SORTED):
        assert torch.equal(permuted[row], TOKENS[slot // 2])


@pytest.mark.parametrize("num_out_tokens, rows", [(None, 8), (0, 8), (5, 5), (100, 8), (-3, 5), (-8, 0)])
def test_permute_num_out_tokens(num_out_tokens, rows):
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(TOKENS, INDICES, num_out_tokens)
    assert permuted.shape == (rows, 3) and sorted_indices.tolist() == SORTED
    keyword, _ = npu_compat.npu_moe_token_permute(TOKENS, INDICES, num_out_tokens=num_out_tokens, padded_mode=False)
    assert torch.equal(keyword, permuted)


def test_permute_positional_fourth_argument_is_padded_mode():
    permuted, _ = npu_compat.npu_moe_token_permute(TOKENS, INDICES, None, False)
    assert permuted.shape == (8, 3)
    with pytest.raises(ValueError, match="padded_mode=True is not supported"):
        npu_compat.npu_moe_token_permute(TOKENS, INDICES, None, True)


def test_permute_one_dimensional_indices_and_errors():
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(TOKENS, torch.tensor([2, 0, 2, 1]))
    assert sorted_indices.tolist() == [2, 0, 3, 1] and permuted[:, 0].tolist() == [2, 4, 1, 3]
    with pytest.raises(ValueError, match="drops more than"):
        npu_compat.npu_moe_token_permute(TOKENS, INDICES, -9)
    with pytest.raises(TypeError, match="num_out_tokens must be an int"):
        npu_compat.npu_moe_token_permute(TOKENS, INDICES, 2.5)
    with pytest.raises(TypeError, match="indices"):
        npu_compat.npu_moe_token_permute(TOKENS, INDICES.float())


def test_unpermute_without_probs_returns_one_row_per_slot():
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(TOKENS, INDICES)
    out = npu_compat.npu_moe_token_unpermute(permuted, sorted_indices)
    assert out.shape == (8, 3)
    assert torch.equal(out, TOKENS.repeat_interleave(2, dim=0))
    with_shape = npu_compat.npu_moe_token_unpermute(permuted, sorted_indices, None, False, (4, 3))
    assert torch.equal(with_shape, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs_dtype", [None, torch.float32])
def test_unpermute_with_probs_and_dropped_rows(dtype, probs_dtype):
    probs = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.125, 0.875], [0.375, 0.625]]).to(probs_dtype or dtype)
    tokens = TOKENS.to(dtype)
    full = npu_compat.npu_moe_token_unpermute(*npu_compat.npu_moe_token_permute(tokens, INDICES), probs)
    assert full.shape == (4, 3) and full.dtype == dtype
    torch.testing.assert_close(full, tokens, atol=0, rtol=0)
    # 5 rows kept: the slots of expert 4 (t0 k1, t1 k0, t2 k0) are dropped and add nothing.
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(tokens, INDICES, 5)
    dropped = npu_compat.npu_moe_token_unpermute(permuted, sorted_indices, probs, False, None)
    kept = torch.tensor([0.25, 0.5, 0.875, 1.0]).unsqueeze(1).to(probs.dtype)
    torch.testing.assert_close(dropped, (TOKENS * kept).to(dtype))
    keywords = npu_compat.npu_moe_token_unpermute(permuted_tokens=permuted, sorted_indices=sorted_indices,
                                                  probs=probs, padded_mode=False, restore_shape=[4, 3])
    assert torch.equal(keywords, dropped)


def test_unpermute_gradients():
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(6, 10, generator=generator, requires_grad=True)
    indices = torch.randint(0, 4, (6, 3), generator=generator)
    probs = torch.rand(6, 3, generator=generator, requires_grad=True)
    permuted, sorted_indices = npu_compat.npu_moe_token_permute(tokens, indices, num_out_tokens=-4)
    out = npu_compat.npu_moe_token_unpermute(permuted, sorted_indices, probs)
    cotangent = torch.randn(out.shape, generator=generator)
    out.backward(cotangent)
    kept = (sorted_indices < permuted.shape[0]).view(6, 3).double()
    t, p = tokens.detach().double().requires_grad_(), probs.detach().double().requires_grad_()
    ((p * kept).unsqueeze(-1) * t.unsqueeze(1)).sum(1).backward(cotangent.double())
    torch.testing.assert_close(tokens.grad, t.grad.float())
    torch.testing.assert_close(probs.grad, p.grad.float())
    with pytest.raises(ValueError, match="padded_mode=True is not supported"):
        npu_compat.npu_moe_token_unpermute(permuted, sorted_indices, probs, padded_mode=True)


def _moe_layer(torch_npu, hidden, expert_ids, expert_probs, weights):
    """A MindSpeed-style MoE layer written against torch_npu's API."""
    normed, _ = torch_npu.npu_rms_norm(hidden, weights["norm"], epsilon=1e-6)
    permuted, sorted_indices = torch_npu.npu_moe_token_permute(normed, expert_ids, num_out_tokens=None)
    gate_up = permuted @ weights["fc1"]
    activated = torch_npu.npu_swiglu(gate_up, dim=-1)
    expert_out = activated @ weights["fc2"]
    out = torch_npu.npu_moe_token_unpermute(expert_out, sorted_indices, probs=expert_probs)
    y, _, residual = torch_npu.npu_add_rms_norm(out, hidden, weights["norm"], 1e-6)
    return y, residual


def test_torch_npu_style_code_runs_unchanged():
    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(8, 16, generator=generator, requires_grad=True)
    expert_ids = torch.randint(0, 4, (8, 2), generator=generator, dtype=torch.int32)
    expert_probs = torch.softmax(torch.randn(8, 2, generator=generator), -1)
    weights = {"norm": torch.rand(16, generator=generator) + 0.5, "fc1": torch.randn(16, 24, generator=generator),
               "fc2": torch.randn(12, 16, generator=generator)}
    y, residual = _moe_layer(npu_compat, hidden, expert_ids, expert_probs, weights)
    y.sum().backward()
    assert y.shape == residual.shape == (8, 16) and hidden.grad.shape == (8, 16)
    h = hidden.detach()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weights["norm"]
    experts = []
    for t in range(8):
        rows = []
        for k in range(2):
            a, b = (n[t] @ weights["fc1"]).chunk(2)
            rows.append(expert_probs[t, k] * ((torch.nn.functional.silu(a) * b) @ weights["fc2"]))
        experts.append(sum(rows))
    s = torch.stack(experts) + h
    torch.testing.assert_close(residual, s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weights["norm"],
                               rtol=1e-5, atol=1e-5)
