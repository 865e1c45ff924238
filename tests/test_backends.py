"""Backend discovery, forcing (environment, use_backend in threads), fallback, and the dispatcher's device kernels."""

import os
import subprocess
import sys
import threading

import pytest
import torch

import mm_kernels
from mm_kernels import dispatch
from mm_kernels.reference import rms_norm as reference


@pytest.fixture
def env_backend(monkeypatch):
    """Sets MM_KERNELS_BACKEND as mm_kernels would have read it on import; restored afterwards."""

    def set_backend(name: str) -> None:
        monkeypatch.setenv(dispatch.ENV_VAR, name)
        dispatch.read_environment()

    yield set_backend
    monkeypatch.undo()
    dispatch.read_environment()


def test_backends_reports_every_backend():
    report = mm_kernels.backends()
    assert set(report) == {"reference", "cpu", "triton", "npu"}
    assert report["reference"] is True
    assert all(isinstance(v, bool) for v in report.values())


def test_forcing_an_unknown_backend_raises(env_backend):
    env_backend("tpu")
    with pytest.raises(ValueError, match="MM_KERNELS_BACKEND='tpu'"):
        dispatch.forced_backend()


def test_forcing_an_unavailable_backend_raises(env_backend):
    if mm_kernels.backends()["npu"]:
        pytest.skip("an NPU is present")
    env_backend("npu")
    with pytest.raises(RuntimeError, match="'npu' was forced but is not available"):
        mm_kernels.rms_norm(torch.ones(2, 3))


def test_env_var_forces_reference(env_backend):
    env_backend("reference")
    assert dispatch.select_backend(torch.device("cpu")) == "reference"


def test_use_backend_overrides_env(env_backend):
    if not mm_kernels.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    env_backend("reference")
    with mm_kernels.use_backend("cpu"):
        chosen = dispatch.select_backend(torch.device("cpu"))
    assert chosen == "cpu"
    assert dispatch.select_backend(torch.device("cpu")) == "reference"


def test_use_backend_is_local_to_its_thread():
    """Thread A enters its block, then B; A leaves first. Each sees its own backend throughout and the
    process is left with none forced (a process-global setting left it on A's backend)."""
    other = "cpu" if mm_kernels.backends()["cpu"] else "reference"
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with mm_kernels.use_backend("reference"):
            a_in.set()
            b_in.wait(timeout=10)
            seen["a inside"] = dispatch.forced_backend()
        a_out.set()
        seen["a after"] = dispatch.forced_backend()

    def thread_b():
        a_in.wait(timeout=10)
        with mm_kernels.use_backend(other):
            b_in.set()
            a_out.wait(timeout=10)
            seen["b inside"] = dispatch.forced_backend()
        seen["b after"] = dispatch.forced_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert seen == {"a inside": "reference", "b inside": other, "a after": None, "b after": None}
    assert dispatch.forced_backend() is None


def test_unavailable_backend_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "backends", lambda: {"reference": True, "cpu": False, "triton": False, "npu": False})
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="backend 'cpu' is not available for cpu tensors") as record:
        first = dispatch.auto_backend(torch.device("cpu"))
        second = dispatch.auto_backend(torch.device("cpu"))
    assert first == second == "reference"
    assert len(record) == 1


@pytest.mark.skipif(not mm_kernels.backends()["cpu"], reason="the C++ extension is not built")
@pytest.mark.parametrize("op", ["rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd", "swiglu_fwd", "swiglu_pair_bwd",
                                "moe_permute_fwd", "moe_unpermute_fwd", "moe_combine_bwd"])
def test_cpu_kernel_of_the_operator_is_the_cpp_one(op):
    cpu_line = next(line for line in torch._C._dispatch_dump(f"mm_kernels::{op}").splitlines()
                    if line.startswith("CPU:"))
    assert "unboxed" in cpu_line, cpu_line  # a C++ function; Python kernels are boxed only


@pytest.mark.skipif(not mm_kernels.backends()["cpu"], reason="the C++ extension is not built")
def test_cpu_call_does_not_go_through_python_backend_modules(monkeypatch):
    from mm_kernels.cpu import rms_norm as cpu_module

    def refuse(*args):
        raise AssertionError("a Python kernel ran")

    for module in (cpu_module, reference):
        for name in ("rms_norm_fwd", "rms_norm_bwd"):
            monkeypatch.setattr(module, name, refuse)
    x = torch.randn(3, 8, requires_grad=True)
    y = mm_kernels.rms_norm(x, torch.ones(8))
    y.sum().backward()
    with torch.no_grad():
        mm_kernels.rms_norm(x, torch.ones(8))
    with pytest.raises(AssertionError, match="a Python kernel ran"), mm_kernels.use_backend("reference"):
        mm_kernels.rms_norm(x, torch.ones(8))


_WITHOUT_CPP = """
import sys, warnings
sys.modules["mm_kernels._C"] = None  # as if the extension were not built
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mm_kernels
    from mm_kernels.reference import rms_norm, swiglu
    x = torch.randn(4, 8)
    assert torch.equal(mm_kernels.rms_norm(x), rms_norm.rms_norm_fwd(x, None, 1e-6, "llama", 0.0)[0])
    assert torch.equal(mm_kernels.swiglu(x), swiglu.swiglu_fwd(x, 1))
    mm_kernels.moe_unpermute(*mm_kernels.moe_permute(x, torch.tensor([[0], [1], [0], [1]])))
    if mm_kernels.backends()["triton"]:
        with mm_kernels.use_backend("triton"):
            torch.testing.assert_close(mm_kernels.swiglu(x), swiglu.swiglu_fwd(x, 1))
assert not mm_kernels.backends()["cpu"]
warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(warned) == 1 and "backend 'cpu' is not available for cpu tensors" in warned[0], warned
"""


def test_without_the_cpp_extension_cpu_calls_run_the_reference_with_one_warning():
    """A source tree without mm_kernels._C (e.g. on a GPU machine): importing works, CPU calls of every op
    run the reference after one warning for the whole process, and Triton still runs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(dispatch.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-c", _WITHOUT_CPP], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_info_command_prints_backends(capsys):
    from mm_kernels.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "torch" in out
