"""The portable (auto-vectorised) C++ loops, which CPUs without AVX512-BF16 run, against the fp64 oracle.

Where the CPU has AVX512-BF16 the kernels use intrinsics loops (csrc/avx512_bf16.cpp); the rest of the
suite tests those. Here a subprocess sets MM_KERNELS_NO_AVX512=1, so the other loops run.
"""

import os
import subprocess
import sys

import pytest

import mm_kernels

_CHECKS = """
import torch
import mm_kernels
from mm_kernels.reference import rms_norm, swiglu
from tests.helpers import assert_close, tolerance

torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((7, 123), (1024, 4097)):  # the second: outputs past the streaming threshold, rows unaligned
        x = torch.randn(shape).to(dtype).requires_grad_()
        w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype).requires_grad_()
        dy = torch.randn(shape).to(dtype)
        for casting in ("llama", "gemma", "none"):
            offset = 0.5 if casting == "gemma" else 0.0  # as tests/test_rms_norm.py: llama rounds (offset + w)
            y = mm_kernels.rms_norm(x, w, 1e-6, casting, offset)
            dx, dw = torch.autograd.grad(y, (x, w), dy)
            x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            y64 = rms_norm.rms_norm_fwd(x64, w64, 1e-6, casting, offset)[0]
            dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
            assert_close(y, y64, dtype, scale=2.0, name="rms_norm y")  # llama and none round twice
            assert_close(dx, dx64, dtype, name="rms_norm dx")
            assert_close(dw, dw64, dtype, scale=shape[0] ** 0.5, name="rms_norm dweight")
    for shape in ((5, 246), (1024, 8194)):
        x = (3 * torch.randn(shape)).to(dtype)
        x.view(-1)[:3] = torch.tensor([float("-inf"), float("inf"), float("nan")])
        x.requires_grad_()
        dy = torch.randn(shape[0], shape[1] // 2).to(dtype)
        y = mm_kernels.swiglu(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        x64 = x.detach().double()
        torch.testing.assert_close(y.double(), swiglu.swiglu_fwd(x64, 1), equal_nan=True, **tolerance(dtype))
        torch.testing.assert_close(dx.double(), swiglu.swiglu_bwd(dy.double(), x64, 1), equal_nan=True,
                                   **tolerance(dtype))
"""


@pytest.mark.skipif(not mm_kernels.backends()["cpu"], reason="the C++ extension is not built")
def test_portable_cpu_loops_match_the_oracle():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MM_KERNELS_NO_AVX512="1", PYTHONPATH=root)
    env.pop("MM_KERNELS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", _CHECKS], capture_output=True, text=True, timeout=600, env=env,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
