"""The CPU adaptor: every patch still fixes a failure of the pinned megatron-core, and the
device mapping does what the patches rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import megatron.core
import pytest
import torch

from mm_train.platform import cpu_adaptor
from tests.train_runner import ROOT


def test_megatron_core_is_the_pinned_version():
    assert megatron.core.__version__ == "0.16.1"


@pytest.mark.parametrize("patch", cpu_adaptor.PATCHES + cpu_adaptor.FALLBACKS, ids=lambda p: p.name)
def test_patch_is_still_needed(patch):
    # Fails when a megatron-core upgrade removed the failure the patch works around: delete the patch.
    assert patch.still_needed(), f"{patch.name} looks stale: {patch.fixes}"


def test_cuda_to_cpu_mode_maps_devices():
    with cpu_adaptor.CudaToCpuMode():
        made = torch.ones(2, device="cuda")
        moved = torch.zeros(2).cuda()
        assert made.device.type == "cpu" and moved.device.type == "cpu"
        assert torch.zeros(1).to("cuda:0").device.type == "cpu"
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"


APPLIED_CHECK = """
import torch
from mm_train.platform import cpu_adaptor
from tests.train_runner import ROOT
from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
assert cpu_adaptor.apply_cpu_adaptor() == [patch.name for patch in cpu_adaptor.PATCHES]
assert torch.cuda.current_device() == torch.device("cpu")
torch.cuda.synchronize()
draws = []
for _ in range(2):
    model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        draws.append(torch.rand(3))
assert torch.equal(draws[0], draws[1])
print("ok")
"""


def test_applied_adaptor_routes_cuda_calls_to_cpu():
    # In a child process: the adaptor's mode stays on for the life of the process it is applied in.
    result = subprocess.run([sys.executable, "-c", APPLIED_CHECK], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_adaptor_stays_off_with_an_accelerator(monkeypatch):
    monkeypatch.setattr(cpu_adaptor, "device_type", lambda: "cuda")
    monkeypatch.setattr(cpu_adaptor, "_applied_patches", [])
    assert cpu_adaptor.apply_cpu_adaptor() == []


def test_missing_packages_get_their_stand_ins_on_any_device(monkeypatch):
    """Without Transformer Engine and grouped_gemm (as on a GPU machine that lacks them), MoE models need
    the router GEMM and grouped GEMM stand-ins whatever the device."""
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils

    monkeypatch.setattr(cpu_adaptor, "device_type", lambda: "cuda")
    monkeypatch.setattr(cpu_adaptor, "_applied_fallbacks", [])
    assert cpu_adaptor.apply_package_fallbacks() == ["moe-router-gemm", "moe-grouped-gemm"]
    assert moe_utils.te_general_gemm is None and grouped_gemm_util.ops.gmm is not None
