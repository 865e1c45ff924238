"""The CPU adaptor: every patch still fixes a failure of the pinned megatron-core, and the
device mapping does what the patches rely on."""

from __future__ import annotations

import megatron.core
import pytest
import torch

from mm_train import cpu_adaptor


def test_megatron_core_is_the_pinned_version():
    assert megatron.core.__version__ == "0.16.1"


@pytest.mark.parametrize("patch", cpu_adaptor.PATCHES, ids=lambda p: p.name)
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


def test_adaptor_stays_off_with_an_accelerator(monkeypatch):
    monkeypatch.setattr(cpu_adaptor, "accelerator_present", lambda: True)
    monkeypatch.setattr(cpu_adaptor, "_applied", [])
    assert cpu_adaptor.apply_cpu_adaptor() == []
