"""Backend discovery, forcing and fallback."""

import pytest
import torch

import mm_kernels
from mm_kernels import dispatch


def test_backends_reports_every_backend():
    report = mm_kernels.backends()
    assert set(report) == {"reference", "cpu", "triton", "npu"}
    assert report["reference"] is True
    assert all(isinstance(v, bool) for v in report.values())


def test_forcing_an_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="MM_KERNELS_BACKEND='tpu'"):
        dispatch.forced_backend()


def test_forcing_an_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "npu")
    if mm_kernels.backends()["npu"]:
        pytest.skip("an NPU is present")
    with pytest.raises(RuntimeError, match="'npu' was forced but is not available"):
        mm_kernels.rms_norm(torch.ones(2, 3))


def test_env_var_forces_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select_backend("rms_norm", torch.device("cpu"), ("reference", "cpu")) == "reference"


def test_use_backend_overrides_env(monkeypatch):
    if not mm_kernels.backends()["cpu"]:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    with mm_kernels.use_backend("cpu"):
        chosen = dispatch.select_backend("rms_norm", torch.device("cpu"), ("reference", "cpu"))
    assert chosen == "cpu"
    assert dispatch._forced is None
    assert dispatch.select_backend("rms_norm", torch.device("cpu"), ("reference", "cpu")) == "reference"


def test_missing_kernel_falls_back_to_reference_with_one_warning():
    with pytest.warns(RuntimeWarning, match="no 'cpu' kernel") as record:
        first = dispatch.select_backend("probe_op", torch.device("cpu"), ("reference",))
        second = dispatch.select_backend("probe_op", torch.device("cpu"), ("reference",))
    assert first == second == "reference"
    assert len([w for w in record if "probe_op" in str(w.message)]) == 1


def test_info_command_prints_backends(capsys):
    from mm_kernels.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "torch" in out
