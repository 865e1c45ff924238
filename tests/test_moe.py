"""MoE permute / unpermute: every backend against the plain reference and Megatron-core, both forms."""

import inspect
import math

import pytest
import torch

import mm_kernels
from mm_kernels import dispatch
from mm_kernels.ops import moe as ops
from mm_kernels.reference import moe as reference
from tests.helpers import DTYPES, assert_close, backend_params, cpu_backends

moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

BACKENDS = backend_params(with_triton=False)
CPP_BUILT = "cpu" in cpu_backends()
INDEX_DTYPES = (torch.int32, torch.int64)


def _route(num_tokens, topk, num_experts, generator, index_dtype=torch.int64):
    """indices [T, K]: K distinct experts per token."""
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    return scores.topk(topk, dim=1).indices.to(index_dtype)


def _index_inputs(num_tokens, hidden, topk, num_experts, dtype, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    indices = _route(num_tokens, topk, num_experts, g, index_dtype)
    probs = torch.rand(num_tokens, topk, generator=g).to(dtype)
    weight = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    return tokens, indices, probs, weight


def _index_round_trip(tokens, indices, probs, weight, num_out_tokens):
    """Ours: permute -> unpermute -> weighted sum, with gradients of tokens and probs."""
    tokens = tokens.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    permuted, sorted_indices = mm_kernels.moe_permute(tokens, indices, num_out_tokens)
    out = mm_kernels.moe_unpermute(permuted, sorted_indices, probs)
    (out.float() * weight.float()).sum().backward()
    return permuted, sorted_indices, out, tokens.grad, probs.grad


def _index_oracle(tokens, indices, probs, weight, num_out_tokens):
    """The same in fp64 through the plain reference functions and torch autograd."""
    tokens = tokens.double().requires_grad_(True)
    probs = probs.double().requires_grad_(True)
    num_rows = reference.num_kept_rows(indices.numel(), num_out_tokens)
    permuted, sorted_indices = reference.permute_fwd(tokens, indices, num_rows, -1)
    out = reference.unpermute_fwd(permuted, sorted_indices, probs, tokens.shape[0])
    (out * weight.double()).sum().backward()
    return permuted, sorted_indices, out, tokens.grad, probs.grad


# ---- golden vectors written by hand --------------------------------------------------------

GOLDEN_TOKENS = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]])
GOLDEN_INDICES = torch.tensor([[1, 0], [2, 1], [0, 2], [1, 1]])
GOLDEN_PROBS = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 0.5], [1.0, 1.5]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_index_form_golden(backend, index_dtype):
    # flat experts [1 0 2 1 0 2 1 1]: expert 0 <- slots 1, 4; expert 1 <- 0, 3, 6, 7; expert 2 <- 2, 5.
    with mm_kernels.use_backend(backend):
        permuted, sorted_indices = mm_kernels.moe_permute(GOLDEN_TOKENS, GOLDEN_INDICES.to(index_dtype))
        out = mm_kernels.moe_unpermute(permuted, sorted_indices, GOLDEN_PROBS)
        dropped, dropped_indices = mm_kernels.moe_permute(GOLDEN_TOKENS, GOLDEN_INDICES.to(index_dtype), 5)
        out_dropped = mm_kernels.moe_unpermute(dropped, dropped_indices, GOLDEN_PROBS)
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.tolist() == [2, 0, 6, 3, 1, 7, 4, 5]
    assert permuted.tolist() == [[0, 1], [4, 5], [0, 1], [2, 3], [6, 7], [6, 7], [2, 3], [4, 5]]
    assert out.tolist() == [[0.0, 0.75], [6.0, 9.0], [14.0, 17.5], [15.0, 17.5]]
    # num_out_tokens=5 keeps rows 0..4: slots 2, 5, 7 (rows 6, 7, 5) are dropped.
    assert dropped.tolist() == [[0, 1], [4, 5], [0, 1], [2, 3], [6, 7]]
    assert dropped_indices.tolist() == [2, 0, 6, 3, 1, 7, 4, 5]
    assert out_dropped.tolist() == [[0.0, 0.75], [4.0, 6.0], [12.0, 15.0], [6.0, 7.0]]


GOLDEN_MAP = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
GOLDEN_MAP_PROBS = torch.tensor([[0.5, 0.0, 0.25], [0.0, 2.0, 4.0], [1.5, 0.75, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_map_form_golden(backend):
    with mm_kernels.use_backend(backend):
        permuted, permuted_probs, sorted_indices = ops.megatron_permute(GOLDEN_TOKENS, GOLDEN_MAP, GOLDEN_MAP_PROBS)
        out = ops.megatron_unpermute(permuted, sorted_indices, (4, 2), GOLDEN_MAP_PROBS, GOLDEN_MAP)
        # capacity 9 // 3 = 3: each expert is padded with its first unrouted tokens.
        padded, padded_probs, padded_indices = ops.megatron_permute(
            GOLDEN_TOKENS, GOLDEN_MAP, GOLDEN_MAP_PROBS, num_out_tokens=9, drop_and_pad=True)
        # capacity 3 // 3 = 1: each expert keeps its first routed token.
        _, _, dropped_indices = ops.megatron_permute(GOLDEN_TOKENS, GOLDEN_MAP, num_out_tokens=3, drop_and_pad=True)
    assert sorted_indices.dtype == torch.int64
    assert sorted_indices.tolist() == [0, 2, 1, 2, 0, 1]
    assert permuted_probs.tolist() == [0.5, 1.5, 2.0, 0.75, 0.25, 4.0]
    assert permuted.tolist() == [[0, 1], [4, 5], [2, 3], [4, 5], [0, 1], [2, 3]]
    assert out.tolist() == [[0.0, 0.75], [12.0, 18.0], [9.0, 11.25], [0.0, 0.0]]
    assert padded_indices.tolist() == [0, 2, 1, 1, 2, 0, 0, 1, 2]
    assert padded_probs.tolist() == [0.5, 1.5, 0.0, 2.0, 0.75, 0.0, 0.25, 4.0, 0.0]
    assert padded[2].tolist() == [2, 3]
    assert dropped_indices.tolist() == [0, 1, 0]


# ---- index form against the reference ------------------------------------------------------

SHAPES = [  # (T, H, K, E, num_out_tokens)
    (37, 123, 2, 5, 0),
    (1, 8, 1, 3, 0),
    (16, 64, 4, 4, 0),  # K = E
    (29, 33, 3, 7, -10),  # drop the last 10 rows
    (20, 16, 2, 6, 25),  # keep 25 rows
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_index_form_matches_reference(backend, dtype, shape):
    num_tokens, hidden, topk, num_experts, num_out_tokens = shape
    inputs = _index_inputs(num_tokens, hidden, topk, num_experts, dtype)
    with mm_kernels.use_backend(backend):
        permuted, sorted_indices, out, dtokens, dprobs = _index_round_trip(*inputs, num_out_tokens)
    ref_permuted, ref_sorted, ref_out, ref_dtokens, ref_dprobs = _index_oracle(*inputs, num_out_tokens)
    assert torch.equal(sorted_indices, ref_sorted)
    assert torch.equal(permuted, ref_permuted.to(dtype))
    assert_close(out, ref_out, dtype, name="out")
    assert_close(dtokens, ref_dtokens, dtype, name="dtokens")
    assert_close(dprobs, ref_dprobs, dtype, scale=math.sqrt(hidden), name="dprobs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_index_form_int32_and_int64_agree_without_probs(backend, index_dtype):
    tokens, indices, _, weight = _index_inputs(24, 40, 3, 8, torch.float32, index_dtype=index_dtype)
    with mm_kernels.use_backend(backend):
        x = tokens.clone().requires_grad_(True)
        permuted, sorted_indices = mm_kernels.moe_permute(x, indices, num_experts=8)
        out = mm_kernels.moe_unpermute(permuted, sorted_indices, restore_shape=(24, 40))
        (out * weight).sum().backward()
    # Without probs every token comes back K times: out = K * tokens, dtokens = K * weight.
    torch.testing.assert_close(out, 3 * tokens)
    torch.testing.assert_close(x.grad, 3 * weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_form_one_dim_indices_and_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(40, 18, generator=g)[:, ::2]  # [40, 9], non-contiguous
    indices = torch.randint(0, 4, (40, 2), generator=g)[:, 0]  # [40], non-contiguous
    probs = torch.rand(1, 40, generator=g).t()  # [40, 1], non-contiguous
    with mm_kernels.use_backend(backend):
        permuted, sorted_indices = mm_kernels.moe_permute(tokens, indices)
        out = mm_kernels.moe_unpermute(permuted, sorted_indices, probs)
    ref_permuted, ref_sorted = reference.permute_fwd(tokens, indices.unsqueeze(-1), 40, -1)
    assert torch.equal(sorted_indices, ref_sorted) and torch.equal(permuted, ref_permuted)
    torch.testing.assert_close(out, tokens * probs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["no_tokens", "idle_experts", "one_expert", "all_dropped"])
def test_index_form_edge_cases(backend, case):
    g = torch.Generator().manual_seed(5)
    num_tokens = 0 if case == "no_tokens" else 12
    tokens = torch.randn(num_tokens, 7, generator=g)
    probs = torch.rand(num_tokens, 2, generator=g)
    weight = torch.randn(num_tokens, 7, generator=g)
    if case == "one_expert":
        indices = torch.full((num_tokens, 2), 3)
    else:
        indices = torch.randint(0, 2, (num_tokens, 2), generator=g) * 5  # experts 1-4 and 6-9 idle
    num_out_tokens = -24 if case == "all_dropped" else 0
    with mm_kernels.use_backend(backend):
        permuted, sorted_indices, out, dtokens, dprobs = _index_round_trip(
            tokens, indices, probs, weight, num_out_tokens)
    ref = _index_oracle(tokens, indices, probs, weight, num_out_tokens)
    assert permuted.shape == ref[0].shape and torch.equal(sorted_indices, ref[1])
    for actual, expected in zip((permuted, out, dtokens, dprobs), (ref[0], ref[2], ref[3], ref[4]), strict=True):
        torch.testing.assert_close(actual, expected.float())


# ---- routing-map form against Megatron-core ------------------------------------------------


def _routing_inputs(num_tokens, hidden, num_experts, topk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    indices = _route(num_tokens, topk, num_experts, g)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, indices, True)
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map
    weight = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    return tokens, routing_map, probs, weight


def _routing_round_trip(permute, unpermute, tokens, routing_map, probs, weight, num_out_tokens, drop_and_pad,
                        probs_in_unpermute):
    """permute -> expert (x2 by the permuted probs) -> unpermute -> weighted sum; with gradients."""
    tokens = tokens.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    permuted, permuted_probs, sorted_indices = permute(
        tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, drop_and_pad=drop_and_pad)
    expert_out = 2 * permuted * permuted_probs.unsqueeze(-1).to(permuted.dtype)
    out = unpermute(expert_out, sorted_indices, restore_shape=tokens.shape,
                    probs=probs if probs_in_unpermute else None, routing_map=routing_map, drop_and_pad=drop_and_pad)
    (out.float() * weight.float()).sum().backward()
    return permuted, permuted_probs, sorted_indices, out, tokens.grad, probs.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("drop_and_pad", [False, True])
@pytest.mark.parametrize("probs_in_unpermute", [False, True])
def test_routing_map_form_matches_megatron(backend, dtype, drop_and_pad, probs_in_unpermute):
    num_tokens, hidden, num_experts, topk = 33, 45, 6, 2
    inputs = _routing_inputs(num_tokens, hidden, num_experts, topk, dtype)
    num_out_tokens = 8 * num_experts if drop_and_pad else num_tokens * topk  # capacity 8 drops and pads
    with mm_kernels.use_backend(backend):
        ours = _routing_round_trip(ops.megatron_permute, ops.megatron_unpermute, *inputs, num_out_tokens,
                                   drop_and_pad, probs_in_unpermute)
    tokens, routing_map, probs, weight = inputs
    theirs = _routing_round_trip(moe_utils.permute, moe_utils.unpermute, tokens.double(), routing_map,
                                 probs.double(), weight.double(), num_out_tokens, drop_and_pad, probs_in_unpermute)
    assert torch.equal(ours[2], theirs[2])
    assert torch.equal(ours[0], theirs[0].to(dtype))
    assert torch.equal(ours[1], theirs[1].float())
    assert_close(ours[3], theirs[3], dtype, name="out")
    assert_close(ours[4], theirs[4], dtype, name="dtokens")
    assert_close(ours[5], theirs[5], dtype, scale=math.sqrt(hidden), name="dprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_map_form_edge_cases(backend):
    tokens = torch.randn(10, 4)
    one_expert = torch.zeros(10, 3, dtype=torch.bool)
    one_expert[:, 1] = True
    for routing_map in (one_expert, torch.ones(10, 3, dtype=torch.bool), torch.zeros(10, 3, dtype=torch.bool)):
        with mm_kernels.use_backend(backend):
            permuted, _, sorted_indices = ops.megatron_permute(tokens, routing_map.to(torch.int32))
            out = ops.megatron_unpermute(permuted, sorted_indices, tokens.shape)
        expected_permuted, _, expected_indices = moe_utils.permute(tokens, routing_map)
        assert torch.equal(sorted_indices, expected_indices) and torch.equal(permuted, expected_permuted)
        torch.testing.assert_close(out, tokens * routing_map.sum(1, keepdim=True))
    with mm_kernels.use_backend(backend):
        permuted, probs_out, sorted_indices = ops.megatron_permute(
            tokens[:0], one_expert[:0], probs=torch.rand(0, 3), num_out_tokens=6, drop_and_pad=True)
    assert permuted.shape == (0, 4) and probs_out.shape == (0,) and sorted_indices.shape == (0,)


@pytest.mark.parametrize("ours, theirs", [(ops.megatron_permute, "permute"), (ops.megatron_unpermute, "unpermute")])
def test_megatron_signatures_match(ours, theirs):
    expected = inspect.signature(getattr(moe_utils, theirs)).parameters
    actual = inspect.signature(ours).parameters
    assert list(actual) == list(expected)
    assert [p.default for p in actual.values()] == [p.default for p in expected.values()]


def test_megatron_dispatcher_calls():
    """The argument forms Megatron's dispatchers pass: num_out_tokens as a 0-d tensor, fused=True."""
    tokens, routing_map, probs, _ = _routing_inputs(12, 8, 4, 2, torch.float32)
    num_out_tokens = routing_map.sum(dim=0).long().sum()
    permuted, permuted_probs, sorted_indices = ops.megatron_permute(
        tokens, routing_map, num_out_tokens=num_out_tokens, fused=True)
    assert permuted_probs is None
    out = ops.megatron_unpermute(permuted, sorted_indices, restore_shape=tokens.shape, routing_map=routing_map,
                                 fused=True)
    torch.testing.assert_close(out, tokens * 2)


# ---- determinism, compile -----------------------------------------------------------------


@pytest.mark.skipif(not CPP_BUILT, reason="the C++ kernels are not built")
def test_cpu_results_do_not_depend_on_thread_count():
    tokens, indices, probs, weight = _index_inputs(64, 300, 4, 8, torch.bfloat16, seed=7)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with mm_kernels.use_backend("cpu"):
                results.append(_index_round_trip(tokens, indices, probs, weight, 0))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


class _MoERoundTrip(torch.nn.Module):
    def forward(self, tokens, indices, probs, routing_map, map_probs):
        permuted, sorted_indices = mm_kernels.moe_permute(tokens, indices, num_out_tokens=-3)
        out = mm_kernels.moe_unpermute(permuted * 2, sorted_indices, probs)
        permuted, permuted_probs, row_tokens = ops.megatron_permute(
            tokens, routing_map, map_probs, num_out_tokens=2 * tokens.shape[0], drop_and_pad=True)
        expert_out = permuted * permuted_probs.unsqueeze(-1)
        out = out + ops.megatron_unpermute(expert_out, row_tokens, tokens.shape, drop_and_pad=True)
        # Without drop_and_pad the number of rows depends on the routing map (a data-dependent size).
        permuted, _, row_tokens = ops.megatron_permute(tokens, routing_map)
        return out + ops.megatron_unpermute(permuted, row_tokens, tokens.shape, map_probs, routing_map)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    tokens, indices, probs, weight = _index_inputs(16, 24, 2, 4, torch.float32, seed=11)
    _, routing_map, map_probs, _ = _routing_inputs(16, 24, 4, 2, torch.float32, seed=12)
    model = _MoERoundTrip()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        x = tokens.clone().requires_grad_(True)
        p = probs.clone().requires_grad_(True)
        mp = map_probs.clone().requires_grad_(True)
        with mm_kernels.use_backend(backend):
            out = fn(x, indices, p, routing_map, mp)
            (out * weight).sum().backward()
        results.append((out, x.grad, p.grad, mp.grad))
    for actual, expected in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected)


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
def test_bad_index_form_input_is_refused(backend):
    """The Python checks of a forced backend; the device's own kernel: the test below."""
    tokens = torch.randn(4, 3)
    indices = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    with mm_kernels.use_backend(backend):
        with pytest.raises(ValueError, match=r"indices \(expert ids\) must be >= 0"):
            mm_kernels.moe_permute(tokens, torch.tensor([[0, 1], [1, -1], [2, 0], [0, 1]]))
        with pytest.raises(ValueError, match=r"num_experts = 2\) must be < 2"):
            mm_kernels.moe_permute(tokens, indices, num_experts=2)
        with pytest.raises(ValueError, match="indices must have shape"):
            mm_kernels.moe_permute(tokens, indices[:3])
        with pytest.raises(TypeError, match="indices must be an int32 or int64"):
            mm_kernels.moe_permute(tokens, indices.float())
        with pytest.raises(TypeError, match="tokens must be a floating-point"):
            mm_kernels.moe_permute(tokens.long(), indices)
        with pytest.raises(ValueError, match=r"num_out_tokens must be >= -T\*K = -8"):
            mm_kernels.moe_permute(tokens, indices, num_out_tokens=-9)
        permuted, sorted_indices = mm_kernels.moe_permute(tokens, indices)
        with pytest.raises(ValueError, match="probs must have shape"):
            mm_kernels.moe_unpermute(permuted, sorted_indices, torch.rand(4, 3))
        with pytest.raises(ValueError, match="permutation"):
            mm_kernels.moe_unpermute(permuted, torch.zeros_like(sorted_indices), torch.rand(4, 2))
        with pytest.raises(ValueError, match="sorted_indices must be < 8"):
            mm_kernels.moe_unpermute(permuted, sorted_indices + 1, torch.rand(4, 2))
        with pytest.raises(ValueError, match="restore_shape"):
            mm_kernels.moe_unpermute(permuted, sorted_indices, restore_shape=(4, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_routing_map_input_is_refused(backend):
    tokens = torch.randn(4, 3)
    routing_map = torch.eye(4, 2, dtype=torch.bool)
    with mm_kernels.use_backend(backend):
        with pytest.raises(TypeError, match="routing_map must be a bool"):
            ops.megatron_permute(tokens, routing_map.float())
        with pytest.raises(ValueError, match="routing_map must have shape"):
            ops.megatron_permute(tokens, routing_map[:3])
        with pytest.raises(ValueError, match="probs must have the shape of routing_map"):
            ops.megatron_permute(tokens, routing_map, probs=torch.rand(4, 3))
        permuted, _, sorted_indices = ops.megatron_permute(tokens, routing_map)
        with pytest.raises(ValueError, match="routing_map .* is required"):
            ops.megatron_unpermute(permuted, sorted_indices, tokens.shape, probs=torch.rand(4, 2))
        with pytest.raises(ValueError, match="token rows"):
            ops.megatron_unpermute(permuted, sorted_indices + 4, tokens.shape)
        with pytest.raises(ValueError, match="routes 1 .* but permuted_tokens has 2 rows"):
            ops.megatron_unpermute(permuted, sorted_indices, tokens.shape, probs=torch.rand(4, 2),
                                   routing_map=torch.eye(4, 2, dtype=torch.bool).roll(1, 1).triu())


def test_bad_indices_are_refused_without_a_forced_backend():
    """The device's own kernel (C++ on CPU) checks the index values too, naming the argument."""
    tokens = torch.randn(4, 3)
    with pytest.raises(ValueError, match="indices"):
        mm_kernels.moe_permute(tokens, torch.tensor([[0, 1], [1, -1], [2, 0], [0, 1]]))
    with pytest.raises(ValueError, match="indices"):
        mm_kernels.moe_permute(tokens, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]), num_experts=2)
    permuted, sorted_indices = mm_kernels.moe_permute(tokens, torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]))
    with pytest.raises(ValueError, match="permutation"):
        mm_kernels.moe_unpermute(permuted, torch.zeros_like(sorted_indices), torch.rand(4, 2))
    with pytest.raises(ValueError, match="sorted_indices"):
        mm_kernels.moe_unpermute(permuted, sorted_indices + 1, torch.rand(4, 2))


def test_accelerator_paths_never_read_values_on_the_host():
    """On an accelerator the index checks and the reference backward must not sync with the host (so that
    they can be captured in a CUDA graph): on meta tensors, which have no values, any host read raises."""
    meta = torch.device("meta")
    tokens, indices = torch.empty(6, 4, device=meta), torch.empty(6, 2, dtype=torch.int64, device=meta)
    sorted_indices, probs = torch.empty(12, dtype=torch.int32, device=meta), torch.empty(6, 2, device=meta)
    ops._check_permute(tokens, indices, 12, 4)
    ops._check_unpermute(torch.empty(10, 4, device=meta), sorted_indices, probs, 6)
    ops._check_gather(tokens, sorted_indices)
    ops._check_combine(tokens, sorted_indices, None, 6)
    dpermuted, dprobs = reference.unpermute_bwd(torch.empty(6, 4, device=meta), torch.empty(10, 4, device=meta),
                                                sorted_indices, probs)
    assert dpermuted.shape == (10, 4) and dprobs.shape == (6, 2)


def test_debug_switch_checks_accelerator_values_on_the_host(monkeypatch):
    """MM_KERNELS_DEBUG=1 reads index values on the host (here: meta tensors, which have none, so it raises)."""
    monkeypatch.setenv(dispatch.DEBUG_ENV_VAR, "1")
    dispatch.read_environment()
    try:
        with pytest.raises((RuntimeError, NotImplementedError)):
            ops._check_permute(torch.empty(6, 4, device="meta"), torch.empty(6, 2, dtype=torch.int64, device="meta"),
                               12, 4)
    finally:
        monkeypatch.undo()
        dispatch.read_environment()


@pytest.mark.skipif(not CPP_BUILT, reason="the C++ kernels are not built")
def test_cpu_operators_check_their_inputs():
    cpu = torch.ops.mm_kernels_cpu
    tokens = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"indices\[3\] = 5 is outside \[0, 4\)"):
        cpu.moe_permute_fwd(tokens, torch.tensor([[0], [1], [2], [5]]), 4, 4)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        cpu.moe_permute_fwd(tokens, torch.zeros(4, 1), 4, 4)
    with pytest.raises(ValueError, match="not a permutation"):
        cpu.moe_unpermute_bwd(tokens, tokens, torch.tensor([0, 1, 1, 2]), None)
    with pytest.raises(ValueError, match=r"sorted_indices \(token rows\)\[3\] = 9 is outside \[0, 4\)"):
        cpu.moe_combine(tokens, torch.tensor([0, 1, 2, 9]), None, 4)


# ---- Triton under the interpreter ---------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_index_form_matches_reference(dtype):
    inputs = _index_inputs(9, 20, 2, 4, dtype, seed=2)
    with mm_kernels.use_backend("triton"):
        permuted, sorted_indices, out, dtokens, dprobs = _index_round_trip(*inputs, -3)
    ref_permuted, ref_sorted, ref_out, ref_dtokens, ref_dprobs = _index_oracle(*inputs, -3)
    assert torch.equal(sorted_indices, ref_sorted) and torch.equal(permuted, ref_permuted.to(dtype))
    scale = 2.0 if dtype == torch.bfloat16 else 1.0  # the interpreter truncates fp32 -> bf16
    assert_close(out, ref_out, dtype, scale=scale, name="out")
    assert_close(dtokens, ref_dtokens, dtype, scale=scale, name="dtokens")
    assert_close(dprobs, ref_dprobs, dtype, scale=scale * math.sqrt(20), name="dprobs")


@pytest.mark.triton
@pytest.mark.parametrize("drop_and_pad", [False, True])
def test_triton_routing_map_form_matches_megatron(drop_and_pad):
    inputs = _routing_inputs(7, 12, 3, 2, torch.float32, seed=4)
    with mm_kernels.use_backend("triton"):
        ours = _routing_round_trip(ops.megatron_permute, ops.megatron_unpermute, *inputs, 9, drop_and_pad, True)
    tokens, routing_map, probs, weight = inputs
    theirs = _routing_round_trip(moe_utils.permute, moe_utils.unpermute, tokens.double(), routing_map,
                                 probs.double(), weight.double(), 9, drop_and_pad, True)
    assert torch.equal(ours[2], theirs[2])
    for actual, expected in zip(ours[3:], theirs[3:], strict=True):
        assert_close(actual, expected, torch.float32)
