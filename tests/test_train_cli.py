"""mm-train's command line: bad flag combinations and broken checkpoints end with one line, no traceback."""

from __future__ import annotations

import shutil

import pytest

from mm_train.cli import main
from tests.train_runner import TINY, losses, run_train

BAD_COMBINATIONS = {
    "both loss modes": (["--calculate-per-sample-loss", "--calculate-per-token-loss"], "mutually exclusive"),
    "fused rmsnorm without RMSNorm": (["--normalization", "LayerNorm", "--use-fused-rmsnorm"],
                                      "--use-fused-rmsnorm needs --normalization RMSNorm"),
    "fused swiglu without swiglu": (["--use-fused-swiglu"], "--use-fused-swiglu needs --swiglu"),
    "global batch not divisible": (["--global-batch-size", "7"], "not divisible by micro batch size"),
}

TINY_NO_SWIGLU = [flag for flag in TINY if flag != "--swiglu"]


@pytest.mark.parametrize("case", list(BAD_COMBINATIONS))
def test_bad_combination_is_refused(case, capsys):
    flags, message = BAD_COMBINATIONS[case]
    base = TINY_NO_SWIGLU if case == "fused swiglu without swiglu" else TINY
    assert main(base + flags) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("mm-train: error: ")


def test_bad_combination_exits_non_zero_without_traceback():
    result = run_train(TINY + ["--calculate-per-sample-loss", "--calculate-per-token-loss"], timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "mm-train: error: --calculate-per-sample-loss and --calculate-per-token-loss are mutually exclusive")


def test_environment_variables_are_validated(capsys, monkeypatch):
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "30")
    assert main(TINY) == 2
    assert "HCCL_CONNECT_TIMEOUT=30 is out of range [120, 7200]" in capsys.readouterr().err
    monkeypatch.delenv("HCCL_CONNECT_TIMEOUT")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]) == 2
    assert "CUDA_DEVICE_MAX_CONNECTIONS=8 must be 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    losses(run_train(TINY + ["--train-iters", "2", "--save", str(save)]))
    return save


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated file", "no manifest"])
def test_broken_checkpoint_is_reported(saved_checkpoint, tmp_path, damage):
    broken = tmp_path / "ckpt"
    shutil.copytree(saved_checkpoint, broken)
    iteration = broken / "iter_0000002"
    if damage == "truncated file":
        model_file = iteration / "mp_rank_00" / "model_optim_rng.pt"
        model_file.write_bytes(model_file.read_bytes()[:1000])
        expected = "is truncated or changed"
    else:
        (iteration / "manifest.json").unlink()
        expected = "is incomplete: no manifest.json"
    result = run_train(TINY + ["--train-iters", "4", "--load", str(broken)], timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert expected in result.stderr.strip().splitlines()[-1]
