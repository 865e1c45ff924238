"""Checkpoints as Megatron writes them: ``--ckpt-format torch`` files hold what Megatron-LM's loader reads,
a checkpoint built the way Megatron-LM builds it resumes here, ``--ckpt-format torch_dist`` resumes at
another TP / PP / DP layout, and virtual pipeline stages train and resume like one process."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from mm_train.checkpoint.state import read_file
from tests.train_runner import ROOT, TINY, losses, rel_close, run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ITERS = 6
RTOL = 1e-4
LAYOUT_RTOL = 2e-3
# What Megatron-LM's check_checkpoint_args and consumed-samples restore read from a checkpoint's args.
MEGATRON_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "consumed_train_samples",
                 "skipped_train_samples", "consumed_valid_samples", "max_position_embeddings",
                 "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type")
SCHEDULER_KEYS = {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps", "min_lr", "start_wd",
                  "end_wd", "wd_incr_style", "wd_incr_steps"}
RNG_KEYS = {"random_rng_state", "np_rng_state", "torch_rng_state", "rng_tracker_states"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted one-process curve, saving (torch format) at iteration 3 and at the end."""
    save = tmp_path_factory.mktemp("reference")
    result = run_train(TINY + ["--train-iters", str(ITERS), "--save", str(save), "--save-interval", "3"])
    return losses(result), save


def test_torch_format_holds_what_megatron_lm_reads(reference):
    _, save = reference
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    path = save / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_optim_rng.pt"]
    state = read_file(path)
    assert {"args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", "rng_state",
            "num_floating_point_operations_so_far"} <= set(state)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 3
    args = state["args"]
    assert isinstance(args, argparse.Namespace) and all(hasattr(args, name) for name in MEGATRON_ARGS)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size, args.consumed_train_samples, args.padded_vocab_size) == (
        2, 64, 4, 1, 1, 24, 512)
    # Megatron-LM reads the keys it knows; "flags" is ours (the schedule check on resume).
    assert set(state["opt_param_scheduler"]) == SCHEDULER_KEYS | {"flags"}
    assert isinstance(state["rng_state"], list) and RNG_KEYS <= set(state["rng_state"][0])
    assert state["num_floating_point_operations_so_far"] > 0
    model = state["model"]
    assert "decoder.layers.1.mlp.linear_fc1.weight" in model and "embedding.word_embeddings.weight" in model
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (192, 64)


def test_checkpoint_built_like_megatron_lm_resumes(reference, tmp_path):
    """A file with Megatron-LM's top-level keys, an args Namespace carrying megatron's own classes, numpy RNG
    states, no manifest and no mm-train keys loads and continues the uninterrupted curve."""
    curve, save = reference
    ours = read_file(save / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, add_position_embedding=False,
                              tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              consumed_train_samples=24, skipped_train_samples=0, consumed_valid_samples=0,
                              params_dtype=torch.float32, attention_backend=AttnBackend.auto,
                              exit_signal=signal.SIGTERM, ckpt_format="torch")
    rng = ours["rng_state"][0]
    assert isinstance(rng["random_rng_state"], tuple) and isinstance(rng["np_rng_state"][1], np.ndarray)
    megatron_lm = {"args": args, "checkpoint_version": 3.0, "iteration": 3, "model": ours["model"],
                   "optimizer": ours["optimizer"], "opt_param_scheduler": ours["opt_param_scheduler"],
                   "rng_state": [rng], "num_floating_point_operations_so_far": 0}
    directory = tmp_path / "iter_0000003" / "mp_rank_00"
    directory.mkdir(parents=True)
    torch.save(megatron_lm, directory / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    unsafe = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(directory / 'model_optim_rng.pt')!r},"
                             " weights_only=True)"], capture_output=True, text=True, cwd=ROOT)
    assert unsafe.returncode != 0 and "Weights only load failed" in unsafe.stderr  # it needs megatron's classes
    result = run_train(TINY + ["--train-iters", str(ITERS), "--load", str(tmp_path)])
    assert f" loading checkpoint from {tmp_path} at iteration 3" in result.stdout
    assert f"successfully loaded checkpoint from {tmp_path} [ t 1/1, p 1/1 ] at iteration 3" in result.stdout
    rel_close(losses(result), curve[3:], RTOL)


def test_load_without_checkpoint_warns_and_starts_from_scratch(reference, tmp_path):
    curve, _ = reference
    result = run_train(TINY + ["--train-iters", "2", "--load", str(tmp_path / "empty")])
    assert (f"WARNING: could not find the metadata file {tmp_path / 'empty'}/latest_checkpointed_iteration.txt\n"
            "    will not load any checkpoints and will start from random\n") in result.stdout
    rel_close(losses(result), curve[:2], RTOL)


TORCH_DIST = ["--ckpt-format", "torch_dist", "--train-iters", str(ITERS)]


@pytest.mark.parametrize("saved, resumed", [
    ((1, []), (2, ["--tensor-model-parallel-size", "2"])),
    ((2, ["--use-distributed-optimizer"]), (2, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"])),
], ids=["tp1-to-tp2", "dp2-to-pp2-distributed-optimizer"])
def test_torch_dist_resumes_at_another_layout(reference, tmp_path, saved, resumed):
    curve, _ = reference
    (save_procs, save_flags), (load_procs, load_flags) = saved, resumed
    first = run_train(TINY + TORCH_DIST + save_flags + ["--save", str(tmp_path), "--save-interval", "3",
                                                        "--exit-interval", "3"], nproc=save_procs)
    assert sorted(p.name for p in (tmp_path / "iter_0000003").iterdir())[:4] == [
        ".metadata", "__0_0.distcp", "__0_1.distcp", "common.pt"]
    rel_close(losses(first), curve[:3], RTOL)
    second = run_train(TINY + TORCH_DIST + load_flags + ["--load", str(tmp_path)], nproc=load_procs)
    assert "RNG state will be ignored" in second.stdout
    rel_close(losses(second), curve[3:], LAYOUT_RTOL)


def test_virtual_pipeline_stages_reproduce_one_process_and_resume(tmp_path):
    four_layers = list(TINY)
    four_layers[four_layers.index("--num-layers") + 1] = "4"
    reference = losses(run_train(four_layers + ["--train-iters", str(ITERS)]))
    interleaved = four_layers + ["--train-iters", str(ITERS), "--pipeline-model-parallel-size", "2",
                                 "--num-layers-per-virtual-pipeline-stage", "1", "--save", str(tmp_path),
                                 "--save-interval", "3"]
    first = run_train(interleaved + ["--exit-interval", "3"], nproc=2)
    checkpoint = read_file(tmp_path / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt")
    assert {"model0", "model1"} <= set(checkpoint) and "model" not in checkpoint
    second = run_train(interleaved + ["--load", str(tmp_path)], nproc=2)
    rel_close(losses(first) + losses(second), reference, LAYOUT_RTOL)
    shutil.rmtree(tmp_path)
