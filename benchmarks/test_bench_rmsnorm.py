"""pytest-benchmark over the quick RMSNorm cases (run once as smoke tests under --benchmark-disable)."""

import math

import pytest
import torch

from mm_kernels.bench import rmsnorm
from tests.helpers import tolerance

CASES = rmsnorm.cases(torch.device("cpu"), [torch.float32, torch.bfloat16], quick=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-{c.shape}-{c.dtype}".replace(" ", ""))
def test_rmsnorm(benchmark, case):
    inputs = case.make_inputs()
    ours = benchmark(case.ours, *inputs)
    expected = case.reference(*inputs)
    if case.mode == "fwd":
        torch.testing.assert_close(ours, expected, **tolerance(case.dtype))
        return
    rows = inputs[0].shape[0]
    dx, dweight = ours
    torch.testing.assert_close(dx, expected[0], **tolerance(case.dtype))
    torch.testing.assert_close(dweight, expected[1], **tolerance(case.dtype, scale=math.sqrt(rows)))
