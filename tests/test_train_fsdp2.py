"""mm-train with --use-torch-fsdp2 and --ckpt-format torch_dcp on a tiny fp32 model: 2 FSDP2 ranks
(built on the meta device) reproduce the one-process curve, a torch_dcp checkpoint saved at 10
resumes on 2 ranks (meta device again) or on 1 process and continues the curve, per-token loss
is scaled as without FSDP2, incompatible flags are refused in one line, and the examples/ launch
scripts run."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from mm_train.cli import main
from mm_train.errors import ConfigError
from mm_train.features.fsdp2 import sharding_config
from tests.distributed import free_port
from tests.train_runner import ROOT, TINY, grad_norms, losses, rel_close, run_train

EXAMPLE_CONFIG = str(ROOT / "examples" / "fsdp2_config.yaml")
FSDP2 = ["--use-torch-fsdp2", "--fsdp2-config-path", EXAMPLE_CONFIG, "--use-cpu-initialization"]
DCP = ["--ckpt-format", "torch_dcp"]
# Param-group rules that change the curve, so a torch optimizer with other groups would not match.
GROUPS = ["--weight-decay", "0.1", "--weight-decay-exclude-modules", "word_embeddings",
          "--lr-scale-modules", "linear_qkv", "--lr-mult", "3.0"]
ITERS, SAVE_AT = 14, 10
LAYOUT_RTOL, RESUME_RTOL = 2e-3, 1e-4
GRAD_NORM_RTOL = 1e-2  # the log prints 3 decimals; a wrong gradient scale is off by orders of magnitude


@pytest.fixture(scope="module")
def reference():
    """One process, Megatron DDP and optimizer: the curve and gradient norms to reproduce."""
    result = run_train(TINY + GROUPS + ["--train-iters", str(ITERS)])
    return losses(result), grad_norms(result)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """2 FSDP2 ranks, model built on meta, torch_dcp checkpoints at SAVE_AT and ITERS."""
    save = tmp_path_factory.mktemp("dcp")
    result = run_train(TINY + GROUPS + FSDP2 + DCP + ["--init-model-with-meta-device", "--train-iters", str(ITERS),
                                                      "--save", str(save), "--save-interval", str(SAVE_AT)], nproc=2)
    return losses(result), grad_norms(result), save


def _resume_dir(save, tmp_path):
    resumed = tmp_path / "ckpt"
    shutil.copytree(save, resumed)
    (resumed / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    return resumed


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_reproduce_single_process_curve(reference, fsdp2_run):
    curve, norms = reference
    fsdp2_curve, fsdp2_norms, _ = fsdp2_run
    rel_close(fsdp2_curve, curve, LAYOUT_RTOL)
    rel_close(fsdp2_norms, norms, GRAD_NORM_RTOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_torch_dcp_checkpoint_is_sharded(fsdp2_run):
    _, _, save = fsdp2_run
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    directory = save / f"iter_{SAVE_AT:07d}"
    assert len(list(directory.glob("*.distcp"))) == 2
    assert {p.name for p in directory.glob("*.pt")} == {"common.pt", "rng_rank_0.pt", "rng_rank_1.pt"}
    assert not list(save.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_at_10_with_meta_device_continues_the_curve(fsdp2_run, tmp_path):
    curve, _, save = fsdp2_run
    result = run_train(TINY + GROUPS + FSDP2 + DCP + ["--init-model-with-meta-device", "--train-iters", str(ITERS),
                                                      "--load", str(_resume_dir(save, tmp_path))], nproc=2)
    rel_close(losses(result), curve[SAVE_AT:], RESUME_RTOL)


@pytest.mark.slow
def test_resume_on_one_process_reshards_the_checkpoint(fsdp2_run, tmp_path):
    curve, _, save = fsdp2_run
    resumed = _resume_dir(save, tmp_path)
    flags = TINY + GROUPS + FSDP2 + DCP + ["--train-iters", str(ITERS), "--load", str(resumed)]
    refused = run_train(flags)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].endswith("saved at world size 2, loading at 1; load it with "
                                                            "--no-load-rng")
    rel_close(losses(run_train(flags + ["--no-load-rng"])), curve[SAVE_AT:], RESUME_RTOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_per_token_loss_gradients_match_single_process():
    flags = TINY + ["--train-iters", "3", "--calculate-per-token-loss", "--variable-seq-lengths"]
    single = run_train(flags)
    sharded = run_train(flags + FSDP2, nproc=2)
    rel_close(losses(sharded), losses(single), LAYOUT_RTOL)
    rel_close(grad_norms(sharded), grad_norms(single), GRAD_NORM_RTOL)


REFUSED = {
    "torch_dcp without FSDP2": (DCP, "--ckpt-format torch_dcp needs --use-torch-fsdp2"),
    "meta device without FSDP2": (["--init-model-with-meta-device"],
                                  "--init-model-with-meta-device requires --use-torch-fsdp2"),
    "no config": (["--use-torch-fsdp2", "--use-cpu-initialization"], "--use-torch-fsdp2 requires --fsdp2-config-path"),
    "no cpu initialization": (FSDP2[:3], "--use-torch-fsdp2 requires --use-cpu-initialization"),
    "tensor parallel": (FSDP2 + ["--tensor-model-parallel-size", "2"], "needs --tensor-model-parallel-size 1"),
    "distributed optimizer": (FSDP2 + ["--use-distributed-optimizer"],
                              "cannot be combined with --use-distributed-optimizer"),
    "megatron recompute": (FSDP2 + ["--recompute-granularity", "full"], "list the modules under recompute_modules"),
    "torch checkpoints": (FSDP2 + ["--save", "ckpt"], "--ckpt-format torch_dcp only, got torch"),
    "fp16": (FSDP2 + ["--fp16"], "cannot be combined with --fp16 (no loss scaling): use --bf16"),
    "missing config file": (["--use-torch-fsdp2", "--use-cpu-initialization", "--fsdp2-config-path", "nowhere.yaml"],
                            "--fsdp2-config-path nowhere.yaml: no such file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_incompatible_flags_refused_in_one_line(case, capsys):
    flags, message = REFUSED[case]
    assert main(TINY + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-train: error: ") and err.count("\n") == 1
    assert message in err


def test_bad_config_key_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "fsdp2.yaml"
    config.write_text("sharding_size: 3\n")
    assert main(TINY + ["--use-torch-fsdp2", "--use-cpu-initialization", "--fsdp2-config-path", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key 'sharding_size': 3 does not divide the world size 1" in err


def test_bf16_becomes_fsdp2_param_dtype(tmp_path):
    config = sharding_config(EXAMPLE_CONFIG, bf16=True, world_size=2)
    assert (config.param_dtype, config.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert sharding_config(EXAMPLE_CONFIG, bf16=False, world_size=2).param_dtype is None
    explicit = tmp_path / "fp32.yaml"
    explicit.write_text("param_dtype: fp32\n")
    with pytest.raises(ConfigError, match="--bf16 conflicts with param_dtype torch.float32"):
        sharding_config(str(explicit), bf16=True, world_size=2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("script", ["pretrain_gpt_tiny.sh", "pretrain_gpt_tiny_fsdp2.sh"])
def test_example_launch_script_trains_on_two_processes(script, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port()),
           "TRAIN_ITERS": "4", "CKPT_DIR": str(tmp_path / "ckpt")}
    result = subprocess.run(["bash", str(ROOT / "examples" / script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)
    curve = losses(result)
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert (tmp_path / "ckpt" / "iter_0000004").is_dir()
