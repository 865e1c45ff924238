"""The launch scripts of examples/ (real MindSpeed-LLM / MindSpeed-MM scripts' flags, tiny sizes) start,
train a few iterations, name every flag that has no effect here, and report their throughput."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mm_train.features.compat import NO_EFFECT
from tests.distributed import free_port
from tests.train_runner import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ITERS = 3
SCRIPTS = ["pretrain_llama2_tiny.sh", "pretrain_qwen25_tiny_32k.sh", "pretrain_llama2_tiny_128k_cp.sh",
           "pretrain_mixtral_tiny.sh", "pretrain_deepseek_style_moe_tiny.sh", "finetune_vlm_style_tiny.sh"]
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+) \|")
NO_EFFECT_FLAGS = {"--" + name.rstrip("=").replace("_", "-") for _, names in NO_EFFECT for name in names}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tokenizers and datasets the scripts read, made by examples/make_tiny_assets.py."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("assets")
    subprocess.run([sys.executable, "examples/make_tiny_assets.py", str(directory)], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return directory


def _script_flags(script: str) -> set[str]:
    text = (ROOT / "examples" / script).read_text()
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, flags=re.MULTILINE))


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_trains_and_reports(assets, tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DATA_DIR": str(assets),
           "TRAIN_ITERS": str(ITERS), "MASTER_PORT": str(free_port()), "LOG_DIR": str(tmp_path / "logs"),
           "CKPT_LOAD_DIR": str(tmp_path / "ckpt"), "CKPT_SAVE_DIR": str(tmp_path / "ckpt"),
           "LOAD_PATH": str(tmp_path / "pretrained"), "SAVE_PATH": str(tmp_path / "save")}
    result = subprocess.run(["bash", f"examples/{script}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    lines = [line for line in result.stdout.splitlines() if ELAPSED.search(line)]
    assert len(lines) == ITERS and all("| lm loss: " in line for line in lines)
    notice = next(line for line in result.stdout.splitlines() if line.startswith("mm-train: no effect here: "))
    for flag in _script_flags(script) & NO_EFFECT_FLAGS:
        assert f"{flag} " in notice or f"{flag}(" in notice or notice.endswith(flag), flag
    assert "successfully saved checkpoint from iteration       3" in result.stdout
    mean = sum(float(ELAPSED.search(line).group(1)) for line in lines) / ITERS
    assert f"step time (ms): {mean:.1f}" in result.stdout
    assert re.search(r"^samples per second: [0-9.]+$", result.stdout, flags=re.MULTILINE)
    if "--log-tps" in _script_flags(script):
        assert re.search(r"^tokens per second: [0-9.]+$", result.stdout, flags=re.MULTILINE)
