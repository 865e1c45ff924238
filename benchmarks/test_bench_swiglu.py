"""pytest-benchmark over the quick SwiGLU cases (run once as smoke tests in CI)."""

import pytest
import torch

from mm_kernels.bench.swiglu import cases

CASES = cases(torch.device("cpu"), [torch.float32, torch.bfloat16], quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.mode}-{c.shape}-{c.dtype}" for c in CASES])
def test_swiglu_benchmark(benchmark, case):
    inputs = case.make_inputs()
    result = benchmark(case.ours, *inputs)
    expected = case.reference(*inputs)
    torch.testing.assert_close(result, expected, atol=2e-2, rtol=2e-2)
