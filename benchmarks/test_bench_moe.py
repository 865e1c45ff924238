"""pytest-benchmark over the quick MoE cases (run once as smoke tests in CI)."""

import pytest
import torch

from mm_kernels.bench.moe import cases
from tests.helpers import assert_close

CASES = cases(torch.device("cpu"), [torch.float32, torch.bfloat16], quick=True)


def _in_fp32(value):
    """Floating-point inputs as fp32 leaves (the reference then sums bf16 inputs without bf16 rounding)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().float().requires_grad_(value.requires_grad)
    return value


@pytest.mark.parametrize("case", CASES, ids=[f"{c.mode}-{c.shape}-{c.dtype}" for c in CASES])
def test_moe_benchmark(benchmark, case):
    inputs = case.make_inputs()
    result = benchmark(case.ours, *inputs)
    expected = case.reference(*[_in_fp32(v) for v in inputs])
    for actual, wanted in zip(*(r if isinstance(r, tuple) else (r,) for r in (result, expected)), strict=True):
        assert_close(actual, wanted, case.dtype, name=case.mode)
