"""pytest-benchmark over the quick cases of every kernel benchmark (run once as smoke tests under
--benchmark-disable): ours is timed, and its output and gradients are checked against the eager baseline."""

import math

import pytest
import torch

from mm_kernels.bench import harness
from mm_kernels.bench.cli import kernel_modules
from tests.helpers import assert_close

CASES = [case for module in kernel_modules().values()
         for case in module.cases(torch.device("cpu"), [torch.float32, torch.bfloat16], quick=True)]


def _in_fp64(value):
    """Floating-point inputs as fp64 leaves: the eager baseline then computes the exact answer."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _output_and_grads(forward, case, inputs, dy):
    out = forward(*inputs)
    if case.timing == "fwd":
        return [out]
    return [out, *torch.autograd.grad(out, [inputs[i] for i in case.grad_of], dy.to(out.dtype))]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.mode}-{c.shape}-{c.dtype}".replace(" ", "")
                                             for c in CASES])
def test_kernel_benchmark(benchmark, case):
    inputs = case.make_inputs()
    benchmark(harness._timed(case.ours, case, inputs))
    dy = torch.randn_like(case.ours(*inputs))
    actual = _output_and_grads(case.ours, case, inputs, dy)
    expected = _output_and_grads(case.eager, case, [_in_fp64(v) for v in inputs], dy)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        # Ours rounds twice in 16-bit dtypes (the llama casting, the output); a gradient of a smaller operand
        # (weight, probs) sums over the output elements mapped to each of its elements instead.
        terms = actual[0].numel() / max(a.numel(), 1) if i > 0 else 1.0
        assert_close(a, e, case.dtype, scale=math.sqrt(terms) if terms > 1 else 2.0, name=f"output {i}")
