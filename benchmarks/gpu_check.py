"""Checks of the Triton kernels on a CUDA GPU, without pytest (``bash benchmarks/gpu.sh`` runs it).

Every op family through the public API (the dispatcher's CUDA kernel) against the reference on the
same inputs in fp64, values and gradients, at sizes the GPU kernels tile differently (several rows per
program, chunked long rows, odd widths); RMSNorm's weight gradient bit-identical over runs; MoE
permute/unpermute forward and backward without a host sync (torch.cuda sync debug mode "error") and
captured in a CUDA graph; a bad expert id stopped by the device assertion (in a subprocess, since it
ends the CUDA context). ``--device cpu`` runs the value checks on the Triton interpreter (set
TRITON_INTERPRET=1) with small shapes. Prints one line per check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable

import torch

import mm_kernels
from mm_kernels.ops.attention import attention_fwd
from mm_kernels.reference import attention as attention_reference
from mm_kernels.reference import moe as moe_reference
from mm_kernels.reference import rms_norm as rms_norm_reference
from mm_kernels.reference import swiglu as swiglu_reference
from tests.helpers import tolerance

FAILURES: list[str] = []


def check(name: str, fn: Callable[[], str]) -> None:
    """Runs one check; it returns a detail line or raises (AssertionError: a wrong result)."""
    try:
        detail = fn()
        print(f"PASS  {name}: {detail}", flush=True)
    except Exception as exc:  # every failure is reported, then the next check runs
        FAILURES.append(name)
        print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=4)


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Asserts ``actual`` is within the tolerance of ``dtype`` of ``expected`` (NaN where it has NaN);
    returns the max error."""
    actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance(dtype, scale), msg=lambda m: f"{name}: {m}")
    return (actual - expected).abs().nan_to_num().max().item()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dy.to(out.dtype))


def rms_norm_case(device, rows: int, hidden: int, dtype: torch.dtype, casting: str) -> Callable[[], str]:
    def run() -> str:
        gen = torch.Generator().manual_seed(rows + hidden)
        x = torch.randn(rows, hidden, generator=gen).to(device, dtype)
        weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(device, dtype)
        dy = torch.randn(rows, hidden, generator=gen).to(device, dtype)
        offset = 1.0 if casting == "gemma" else 0.0
        xs, ws = _leaf(x), _leaf(weight)
        y, rstd = mm_kernels.rms_norm_with_rstd(xs, ws, 1e-6, casting, offset)
        dx, dw = _grads(y, [xs, ws], dy)
        x64, w64 = _leaf(x.double()), _leaf(weight.double())
        y_ref, rstd_ref = rms_norm_reference.rms_norm_fwd(x64, w64, 1e-6, casting, offset)
        dx_ref, dw_ref = _grads(y_ref, [x64, w64], dy)
        errors = [_close("y", y, y_ref, dtype), _close("rstd", rstd, rstd_ref, torch.float32),
                  _close("dx", dx, dx_ref, dtype), _close("dweight", dw, dw_ref, dtype, math.sqrt(rows))]
        return "max errors " + ", ".join(f"{e:.2g}" for e in errors)

    return run


def add_rms_norm_case(device, rows: int, hidden: int, dtype: torch.dtype) -> Callable[[], str]:
    def run() -> str:
        x, res = (torch.randn(rows, hidden, device=device).to(dtype) for _ in range(2))
        weight = torch.rand(hidden, device=device).to(dtype) + 0.5
        y, _, summed = mm_kernels.add_rms_norm(x, res, weight)
        # The interpreter truncates fp32 -> 16-bit floats instead of rounding: one step there.
        step = torch.finfo(dtype).eps if device.type == "cpu" and dtype != torch.float32 else 0.0
        torch.testing.assert_close(summed, x + res, atol=0, rtol=step, msg="x + residual differs from torch's sum")
        y_ref, _ = rms_norm_reference.rms_norm_fwd(summed.double(), weight.double(), 1e-6, "llama", 0.0)
        return f"max error {_close('y', y, y_ref, dtype):.2g}"

    return run


def dweight_bits_case(device, rows: int, hidden: int) -> Callable[[], str]:
    def run() -> str:
        x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        weights = []
        for _ in range(3):
            w = torch.ones(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
            weights.append(torch.autograd.grad(mm_kernels.rms_norm(x, w), w, dy)[0])
        assert all(torch.equal(weights[0], w) for w in weights[1:]), "dweight bits differ between runs"
        return "identical over 3 runs"

    return run


def swiglu_case(device, shape: tuple[int, ...], dim: int, dtype: torch.dtype) -> Callable[[], str]:
    def run() -> str:
        x = (3 * torch.randn(shape)).to(device, dtype)
        x.view(-1)[:3] = torch.tensor([float("-inf"), float("inf"), float("nan")])
        out_shape = list(shape)
        out_shape[dim] //= 2
        dy = torch.randn(out_shape).to(device, dtype)
        xs = _leaf(x)
        y = mm_kernels.swiglu(xs, dim)
        (dx,) = _grads(y, [xs], dy)
        y_ref = swiglu_reference.swiglu_fwd(x.double(), dim)
        dx_ref = swiglu_reference.swiglu_bwd(dy.double(), x.double(), dim)
        return f"max errors {_close('y', y, y_ref, dtype):.2g}, {_close('dx', dx, dx_ref, dtype):.2g}"

    return run


def swiglu_pair_case(device, rows: int, width: int, dtype: torch.dtype) -> Callable[[], str]:
    def run() -> str:
        gate, up, dy = (torch.randn(rows, width, device=device).to(dtype) for _ in range(3))
        gs, us = _leaf(gate), _leaf(up)
        y = mm_kernels.swiglu_pair(gs, us)
        dgate, dup = _grads(y, [gs, us], dy)
        dgate_ref, dup_ref = swiglu_reference.swiglu_pair_bwd(dy.double(), gate.double(), up.double())
        errors = [_close("y", y, swiglu_reference.swiglu_pair_fwd(gate.double(), up.double()), dtype),
                  _close("dgate", dgate, dgate_ref, dtype), _close("dup", dup, dup_ref, dtype)]
        return "max errors " + ", ".join(f"{e:.2g}" for e in errors)

    return run


def attention_case(device, batch, seq_q, seq_k, heads_q, heads_kv, dim, dtype, causal, padded=False,
                   dropout_p=0.0) -> Callable[[], str]:
    """Values and gradients of the fused attention against the fp64 reference; ``padded``: a key-padding
    mask (batch row b keeps its first seq_k - 3 b keys); ``dropout_p``: the reference draws the same mask."""
    def run() -> str:
        q = torch.randn(batch, seq_q, heads_q, dim, device=device).to(dtype)
        k, v = (torch.randn(batch, seq_k, heads_kv, dim, device=device).to(dtype) for _ in range(2))
        dout = torch.randn_like(q)
        lengths = seq_k - 3 * torch.arange(batch, device=device)
        mask = (torch.arange(seq_k, device=device) >= lengths[:, None])[:, None, :].expand(batch, seq_q, seq_k) \
            if padded else None
        seed = torch.tensor([20260101], device=device) if dropout_p else None
        leaves = [_leaf(t) for t in (q, k, v)]
        out, lse = attention_fwd(*leaves, mask, causal, dim ** -0.5, dropout_p, seed)
        grads = _grads(out, leaves, dout)
        ref_leaves = [_leaf(t.double()) for t in (q, k, v)]
        out_ref, lse_ref = attention_reference.attention_fwd(*ref_leaves, mask, causal, dim ** -0.5, dropout_p, seed)
        grads_ref = _grads(out_ref, ref_leaves, dout)
        # Attention sums over keys: errors relative to the largest value, as the CPU tests measure them.
        worst = max((a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
                    for a, e in zip((out, lse, *grads), (out_ref, lse_ref, *grads_ref), strict=True))
        limit = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        assert worst <= limit, f"relative error {worst:.2e} > {limit:.0e}"
        return f"relative error {worst:.2g}"

    return run


def _moe_inputs(device, num_tokens, hidden, num_experts, topk, dtype):
    tokens = torch.randn(num_tokens, hidden, device=device).to(dtype)
    indices = torch.rand(num_tokens, num_experts, device=device).topk(topk, dim=1).indices
    probs = torch.rand(num_tokens, topk, device=device).to(dtype)
    return tokens, indices, probs


def _moe_round_trip(tokens, indices, probs, num_out_tokens):
    permuted, sorted_indices = mm_kernels.moe_permute(tokens, indices, num_out_tokens)
    return mm_kernels.moe_unpermute(permuted, sorted_indices, probs)


def moe_case(device, num_tokens, hidden, num_experts, topk, dtype, num_out_tokens) -> Callable[[], str]:
    def run() -> str:
        tokens, indices, probs = _moe_inputs(device, num_tokens, hidden, num_experts, topk, dtype)
        dout = torch.randn(num_tokens, hidden, device=device).to(dtype)
        ts, ps = _leaf(tokens), _leaf(probs)
        out = _moe_round_trip(ts, indices, ps, num_out_tokens)
        dtokens, dprobs = _grads(out, [ts, ps], dout)
        t64, p64 = _leaf(tokens.double()), _leaf(probs.double())
        rows = moe_reference.num_kept_rows(indices.numel(), num_out_tokens)
        permuted, sorted_indices = moe_reference.permute_fwd(t64, indices, rows, -1)
        out_ref = moe_reference.unpermute_fwd(permuted, sorted_indices, p64, num_tokens)
        dtokens_ref, dprobs_ref = _grads(out_ref, [t64, p64], dout)
        errors = [_close("out", out, out_ref, dtype), _close("dtokens", dtokens, dtokens_ref, dtype),
                  _close("dprobs", dprobs, dprobs_ref, dtype, math.sqrt(hidden))]
        return "max errors " + ", ".join(f"{e:.2g}" for e in errors)

    return run


def moe_routing_map_case(device, dtype) -> Callable[[], str]:
    def run() -> str:
        tokens, indices, _ = _moe_inputs(device, 300, 256, 16, 2, dtype)
        routing_map = torch.zeros(300, 16, dtype=torch.bool, device=device).scatter_(1, indices, True)
        probs = torch.rand(300, 16, device=device) * routing_map
        capacity_rows = 16 * 40
        ts, ps = _leaf(tokens), _leaf(probs)
        permuted, permuted_probs, rows = mm_kernels.moe_permute_with_routing_map(
            ts, routing_map, ps, num_out_tokens=capacity_rows, drop_and_pad=True)
        out = mm_kernels.moe_unpermute_with_routing_map(permuted * 2, rows, ts.shape, ps, routing_map,
                                                        drop_and_pad=True)
        row_slot = moe_reference.sort_routing_map(routing_map, 40)
        expected_rows = torch.div(row_slot, 16, rounding_mode="floor")
        assert torch.equal(rows, expected_rows), "row order differs from the reference"
        weight = probs.reshape(-1).index_select(0, row_slot)
        out_ref = moe_reference.combine(tokens.double().index_select(0, expected_rows) * 2, expected_rows,
                                        weight.double(), 300)
        torch.testing.assert_close(permuted_probs, probs.reshape(-1).index_select(0, row_slot))
        return f"max error {_close('out', out, out_ref, dtype):.2g}"

    return run


def moe_no_sync_case(device) -> Callable[[], str]:
    """Index-form and drop_and_pad routing-map permute/unpermute, forward and backward, in sync debug mode
    "error": any operation that waits for the device raises."""

    def run() -> str:
        tokens, indices, probs = _moe_inputs(device, 512, 1024, 32, 4, torch.bfloat16)
        routing_map = torch.zeros(512, 32, dtype=torch.bool, device=device).scatter_(1, indices, True)
        map_probs = torch.rand(512, 32, device=device) * routing_map
        ts, ps, mps = _leaf(tokens), _leaf(probs), _leaf(map_probs)
        for attempt in range(2):  # the first pass compiles the kernels (compiling may sync)
            torch.cuda.set_sync_debug_mode("error" if attempt else "default")
            try:
                out = _moe_round_trip(ts, indices, ps, -100)
                permuted, permuted_probs, rows = mm_kernels.moe_permute_with_routing_map(
                    ts, routing_map, mps, num_out_tokens=32 * 64, drop_and_pad=True)
                out = out + mm_kernels.moe_unpermute_with_routing_map(
                    permuted * permuted_probs.unsqueeze(-1).to(permuted.dtype), rows, ts.shape, drop_and_pad=True)
                torch.autograd.grad(out.float().sum(), [ts, ps, mps])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return "no host sync in forward or backward"

    return run


def moe_cuda_graph_case(device) -> Callable[[], str]:
    """Permute -> unpermute forward and backward captured in one CUDA graph, replayed on new inputs."""

    def run() -> str:
        tokens, indices, probs = _moe_inputs(device, 256, 512, 16, 2, torch.float32)
        static = [_leaf(tokens), indices.clone(), _leaf(probs)]

        def step():
            out = _moe_round_trip(static[0], static[1], static[2], 0)
            return (out, *torch.autograd.grad(out.sum(), [static[0], static[2]]))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        new_tokens, new_indices, new_probs = _moe_inputs(device, 256, 512, 16, 2, torch.float32)
        with torch.no_grad():
            static[0].copy_(new_tokens)
            static[1].copy_(new_indices)
            static[2].copy_(new_probs)
        graph.replay()
        torch.cuda.synchronize()
        ts, ps = _leaf(new_tokens), _leaf(new_probs)
        eager_out = _moe_round_trip(ts, new_indices, ps, 0)
        expected = (eager_out, *torch.autograd.grad(eager_out.sum(), [ts, ps]))
        for got, want in zip(captured, expected, strict=True):
            torch.testing.assert_close(got, want)
        return "replay equals eager"

    return run


_BAD_EXPERT = textwrap.dedent("""
    import torch, mm_kernels
    tokens = torch.randn(4, 8, device="cuda")
    mm_kernels.moe_permute(tokens, torch.tensor([[0], [1], [7], [2]], device="cuda"), num_experts=4)
    torch.cuda.synchronize()
""")


def moe_bad_expert_case() -> Callable[[], str]:
    """An expert id of 7 with num_experts=4: a device assertion by default, a ValueError naming the indices
    with MM_KERNELS_DEBUG=1. In subprocesses, since a device assertion ends the CUDA context."""

    def run() -> str:
        path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
        tails = []
        for debug in ("0", "1"):
            env = dict(os.environ, PYTHONPATH=path, MM_KERNELS_DEBUG=debug)
            done = subprocess.run([sys.executable, "-c", _BAD_EXPERT], capture_output=True, text=True, timeout=120,
                                  env=env)
            assert done.returncode != 0, f"MM_KERNELS_DEBUG={debug}: an expert id of 7 (4 experts) was not refused"
            tails.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "")
        assert "ValueError" in tails[1] and "indices" in tails[1], f"with MM_KERNELS_DEBUG=1: {tails[1]}"
        return f"default: {tails[0][:120]!r}; MM_KERNELS_DEBUG=1: {tails[1][:120]!r}"

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, backends {mm_kernels.backends()}, device "
          f"{torch.cuda.get_device_name() if on_gpu else 'cpu (Triton interpreter)'}", flush=True)
    big = on_gpu
    with mm_kernels.use_backend(None if on_gpu else "triton"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for rows, hidden in ([(4096, 4096), (16384, 1024), (7, 123), (3, 20000)] if big else [(7, 123), (3, 70)]):
                for casting in ("llama", "gemma", "none"):
                    check(f"rms_norm [{rows}, {hidden}] {dtype} {casting}", rms_norm_case(device, rows, hidden, dtype,
                                                                                          casting))
            check(f"add_rms_norm {dtype}", add_rms_norm_case(device, 1000 if big else 5, 5120 if big else 40, dtype))
            for shape, dim in ([((4096, 8192), -1), ((3, 22016), -1), ((4, 10, 7), 1)] if big else [((5, 246), -1)]):
                check(f"swiglu {list(shape)} dim {dim} {dtype}", swiglu_case(device, shape, dim, dtype))
            check(f"swiglu_pair {dtype}", swiglu_pair_case(device, 1000 if big else 7, 4096 if big else 123, dtype))
            check(f"attention {dtype}", attention_case(device, 2, 300 if big else 19, 257 if big else 19, 8, 2, 64,
                                                       dtype, True))
            check(f"attention padded, dropout {dtype}", attention_case(
                device, 3, 300 if big else 19, 300 if big else 19, 8, 2, 64, dtype, False, padded=True, dropout_p=0.1))
            check(f"moe index form {dtype}", moe_case(device, 4096 if big else 33, 1024 if big else 20, 64, 4, dtype,
                                                      -100))
            check(f"moe routing map, drop_and_pad {dtype}", moe_routing_map_case(device, dtype))
        check("rms_norm dweight bits", dweight_bits_case(device, 8192 if big else 300, 4096 if big else 64))
    if on_gpu:
        check("moe without host sync", moe_no_sync_case(device))
        check("moe in a CUDA graph", moe_cuda_graph_case(device))
        check("moe bad expert id", moe_bad_expert_case())
    print(f"gpu_check: {len(FAILURES)} failed" + (f": {', '.join(FAILURES)}" if FAILURES else ""))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    raise SystemExit(main())
