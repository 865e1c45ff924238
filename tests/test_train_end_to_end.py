"""mm-train end to end on a tiny fp32 model: the loss falls, fused kernels match the reference,
a resumed run continues the curve, and every parallel layout reproduces the one-process curve."""

from __future__ import annotations

import shutil

import pytest

from tests.train_runner import TINY, losses, rel_close, run_train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ITERS = 40
LAYOUT_ITERS = 8
LAYOUT_RTOL = 2e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run with reference kernels, saving at iteration 20 and at the end."""
    save = tmp_path_factory.mktemp("reference_ckpt")
    result = run_train(TINY + ["--train-iters", str(ITERS), "--save", str(save), "--save-interval", "20"])
    return losses(result), save


def test_loss_falls(reference):
    curve, _ = reference
    assert len(curve) == ITERS
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 1.0, f"loss fell only from {first:.3f} to {last:.3f} over {ITERS} iterations"


def test_checkpoint_layout(reference):
    _, save = reference
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    for iteration in (20, ITERS):
        directory = save / f"iter_{iteration:07d}"
        assert (directory / "manifest.json").is_file()
        assert (directory / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert not list(save.glob("*.tmp"))


def test_resume_from_iteration_20_continues_the_curve(reference, tmp_path):
    curve, save = reference
    resumed = tmp_path / "ckpt"
    shutil.copytree(save, resumed)
    (resumed / "latest_checkpointed_iteration.txt").write_text("20")
    result = run_train(TINY + ["--train-iters", str(ITERS), "--load", str(resumed)])
    rel_close(losses(result), curve[20:], rtol=1e-4)


def test_fused_kernels_match_reference(reference):
    curve, _ = reference
    result = run_train(TINY + ["--train-iters", str(ITERS), "--use-fused-rmsnorm", "--use-fused-swiglu"])
    rel_close(losses(result), curve, rtol=2e-3)


LAYOUTS = {
    "dp2-distributed-optimizer-overlap": (2, ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                              "--overlap-param-gather", "--ddp-bucket-size", "20000"]),
    "tp2-sequence-parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "full-recompute": (1, ["--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_reproduces_single_process_curve(reference, layout):
    curve, _ = reference
    nproc, flags = LAYOUTS[layout]
    result = run_train(TINY + ["--train-iters", str(ITERS), "--exit-interval", str(LAYOUT_ITERS), *flags],
                       nproc=nproc)
    rel_close(losses(result), curve[:LAYOUT_ITERS], rtol=LAYOUT_RTOL)


def test_variable_lengths_per_sample_loss_under_pipeline_parallel():
    flags = TINY + ["--train-iters", "3", "--variable-seq-lengths", "--calculate-per-sample-loss"]
    single = losses(run_train(flags))
    rel_close(losses(run_train(flags + ["--pipeline-model-parallel-size", "2"], nproc=2)), single,
               rtol=LAYOUT_RTOL)
