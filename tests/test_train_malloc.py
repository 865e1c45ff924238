"""Host memory: with glibc malloc tuned, a step that allocates, casts and frees the same large buffers stops
faulting pages in after the first steps; --no-malloc-tuning keeps the defaults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mm_train.cli import parse_args
from mm_train.config import build_config
from mm_train.launch import Launch
from tests.train_runner import ROOT, TINY

STEPS = """
import statistics, sys, torch
from mm_train.platform.malloc import minor_faults, tune_malloc
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    assert tune_malloc()
def step():  # 64 MB fp32 and 32 MB bf16 buffers: glibc maps blocks above 32 MB for each allocation
    x = torch.randn(4096, 4096)
    for _ in range(2):
        y = x.to(torch.bfloat16).float() * 2
        del y
faults = []
for _ in range(9):
    before = minor_faults()
    step()
    faults.append(minor_faults() - before)
print(int(statistics.median(faults[3:])))
"""


def _faults_per_step(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is for glibc")
def test_tuned_malloc_stops_the_page_faults_of_repeated_steps():
    default, tuned = _faults_per_step("default"), _faults_per_step("tuned")
    assert default > 16384  # each step maps its buffers afresh, 4 KiB pages (16384 in a 64 MB buffer) ...
    assert tuned < default / 20, (tuned, default)  # ... and reuses them once tuned


def test_malloc_tuning_is_on_unless_switched_off():
    launch = Launch(0, 1, 0, "cpu")
    assert build_config(parse_args(TINY), launch).allocator.malloc_tuning
    assert not build_config(parse_args(TINY + ["--no-malloc-tuning"]), launch).allocator.malloc_tuning
