"""mm-train under faults: fp16 loss scaling, NaN/Inf, stop signals and time limits, corrupt or mismatched
checkpoints, schedule changes on resume, a finished run resumed, dropout across a resume, refused
model and size flags, damaged data files, and bad context-parallel inputs on one rank.

A user's mistake ends in one line and a non-zero exit (no traceback); no valid checkpoint is replaced
by a worse one."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch

from mm_kernels.parallel import RING, ULYSSES, cp_attention
from mm_train.checkpoint.compatibility import model_differences
from mm_train.checkpoint.state import TrainingState, read_file
from mm_train.cli import build_parser, main, parse_args
from mm_train.config import build_config
from mm_train.data.documents import check_indexed_files, indexed_dataset_module
from mm_train.errors import CheckpointError, ConfigError, DataError
from mm_train.features.fsdp2 import sharding_config
from mm_train.features.resilience import NonFiniteError, ResilienceConfig, RunGuard
from mm_train.launch import Launch
from mm_train.optim import build_scheduler
from tests.distributed import run_ranks
from tests.train_runner import TINY, losses, rel_close, run_train, start_train

ONE_PROCESS = Launch(rank=0, world_size=1, local_rank=0, device_type="cpu")
MARKER = "latest_checkpointed_iteration.txt"
LEARNING_RATE = re.compile(r"\| learning rate: ([0-9.E+\-]+) \|")
ITERATION = re.compile(r"^ \[[^]]+\] iteration +(\d+)/")


def run_config(flags: list[str]):
    return build_config(parse_args(TINY + flags), ONE_PROCESS)


def last_error_line(result) -> str:
    """The last stderr line of a run that must have failed in one line, without a traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def one_line_refusal(argv: list[str], capsys) -> str:
    """The error of an in-process ``main(argv)`` that must refuse the flags (exit 2, one line)."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-train: error: ") and err.count("\n") == 1, err
    return err


# ---- fp16 with dynamic loss scaling -------------------------------------------------------------

def _fp16_steps(rank: int, world_size: int, flags: list[str], steps: int) -> list[tuple]:
    """(updated, loss scale, grad norm, learning rate) after each of ``steps`` fp16 iterations."""
    from mm_train.engines import build_engine

    launch = Launch(rank, world_size, 0, "cpu")
    engine = build_engine(build_config(parse_args(TINY + ["--fp16", *flags]), launch), launch)
    try:
        data, _ = engine.data(TrainingState())
        results = [engine.train_step(data) for _ in range(steps)]
        return [(r.updated, r.loss_scale, r.grad_norm, engine.learning_rate()) for r in results]
    finally:
        engine.close()


@pytest.mark.distributed
def test_fp16_overflows_are_skipped_and_the_loss_scale_follows_megatron():
    # From 2**32 every gradient overflows: no update, no schedule step, the scale halves from the
    # second overflow on (hysteresis 2).
    overflowing = run_ranks(_fp16_steps, 1, [], 4, timeout=180)[0]
    assert [(updated, scale) for updated, scale, _, _ in overflowing] == [
        (False, 2.0**32), (False, 2.0**31), (False, 2.0**30), (False, 2.0**29)]
    assert all(norm is None and lr == overflowing[0][3] for _, _, norm, lr in overflowing)
    # A small scale: no overflow, and the scale doubles after every --loss-scale-window iterations.
    growing = run_ranks(_fp16_steps, 1, ["--initial-loss-scale", "1024", "--loss-scale-window", "2",
                                         "--hysteresis", "1"], 4, timeout=180)[0]
    assert [(updated, scale) for updated, scale, _, _ in growing] == [
        (True, 1024.0), (True, 2048.0), (True, 2048.0), (True, 4096.0)]
    assert all(0 < norm < 100 for _, _, norm, _ in growing)


@pytest.mark.slow
def test_fp16_trains_like_fp32():
    flags = TINY + ["--train-iters", "12"]
    fp16 = run_train(flags + ["--fp16", "--initial-loss-scale", "4096"])
    rel_close(losses(fp16), losses(run_train(flags)), rtol=2e-3)
    assert "number of skipped iterations:   0 |" in fp16.stdout


@pytest.mark.slow
def test_fp16_overflow_iterations_are_counted_in_the_log():
    result = run_train(TINY + ["--train-iters", "3", "--fp16"])
    lines = [line for line in result.stdout.splitlines() if ITERATION.match(line)]
    assert len(lines) == 3 and losses(result) == []   # as Megatron-LM: a skipped iteration's loss is not averaged
    assert all("number of skipped iterations:   1 |" in line and "grad norm" not in line for line in lines)


def test_fsdp2_refuses_fp16_from_the_yaml(tmp_path):
    config = tmp_path / "fsdp2.yaml"
    for key in ("param_dtype", "reduce_dtype"):
        config.write_text(f"{key}: fp16\n")
        with pytest.raises(ConfigError, match=f"key '{key}': fp16 needs loss scaling"):
            sharding_config(str(config), bf16=False, world_size=1)


# ---- NaN / Inf ----------------------------------------------------------------------------------

def _all_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_all_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(item) for item in value)
    return True


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_iteration_without_saving_it(tmp_path):
    save = tmp_path / "ckpt"
    result = run_train(TINY + ["--lr", "1e6", "--train-iters", "12", "--save", str(save), "--save-interval", "1"])
    assert result.returncode == 1
    stopped = re.fullmatch(r"mm-train: error: iteration (\d+): .* not finite .*", last_error_line(result))
    assert stopped, result.stderr[-500:]
    iteration = int(stopped.group(1))
    assert int((save / MARKER).read_text()) == iteration - 1
    assert not (save / f"iter_{iteration:07d}").exists()
    files = list((save / f"iter_{iteration - 1:07d}").rglob("*.pt"))
    assert files and all(_all_finite(read_file(path)) for path in files)


def test_the_nan_check_is_on_by_default():
    assert run_config([]).resilience.check_for_nan_in_loss_and_grad
    assert not run_config(["--no-check-for-nan-in-loss-and-grad"]).resilience.check_for_nan_in_loss_and_grad


def _guard_decisions(rank: int, world_size: int) -> dict:
    """What two ranks' guards decide: a quiet iteration, SIGTERM on rank 0 only, a NaN loss on rank 1
    only, then the time limit."""
    guard = RunGuard(ResilienceConfig(exit_signal_handler=True))
    try:
        decisions = {"quiet": guard.after_iteration(1, 5.0, 1.0)}
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        decisions["signal"] = guard.after_iteration(2, 5.0, 1.0)
        try:
            guard.after_iteration(3, float("nan") if rank == 1 else None, 1.0)
        except NonFiniteError as error:
            decisions["nan"] = str(error)
    finally:
        guard.close()
    decisions["late"] = RunGuard(ResilienceConfig(exit_duration_in_mins=1e-9)).after_iteration(4, 5.0, 1.0)
    return decisions


@pytest.mark.distributed
def test_the_ranks_agree_on_signals_nan_and_the_time_limit():
    ranks = run_ranks(_guard_decisions, 2, timeout=120)
    assert [r["quiet"] for r in ranks] == [None, None]
    assert [r["signal"] for r in ranks] == ["received SIGTERM", "received a stop signal on another rank"]
    for decisions in ranks:
        assert decisions["nan"].startswith("iteration 3: the loss is not finite")
        assert decisions["late"].startswith("--exit-duration-in-mins 1e-09 reached")


# ---- SIGTERM / SIGINT and the time limit --------------------------------------------------------

def _signalled_run(tmp_path: Path, sig: signal.Signals, nproc: int = 1, extra: tuple[str, ...] = (),
                   to_group: bool = False) -> tuple[int, str, str]:
    """Starts a long run with --exit-signal-handler, sends ``sig`` once iteration 3 is logged (to the
    process, its whole process group, or under torchrun to rank 0 only); returns (status, stdout, stderr)."""
    args = TINY + ["--train-iters", "100000", "--save", str(tmp_path / "ckpt"), "--exit-signal-handler", *extra]
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = start_train(args, nproc, stderr=stderr, start_new_session=to_group)
        try:
            out = []
            for line in process.stdout:
                out.append(line)
                match = ITERATION.match(line)
                if match and int(match.group(1)) >= 3:
                    break
            if nproc > 1:
                worker = next(child for child in psutil.Process(process.pid).children(recursive=True)
                              if child.environ().get("RANK") == "0")
                worker.send_signal(sig)
            elif to_group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
            out.append(process.stdout.read())
            status = process.wait(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
        stderr.seek(0)
        return status, "".join(out), stderr.read()


def _last_iteration(stdout: str) -> int:
    return max(int(m.group(1)) for m in map(ITERATION.match, stdout.splitlines()) if m)


@pytest.mark.slow
@pytest.mark.parametrize("sig, to_group, extra", [(signal.SIGTERM, False, ()),
                                                  (signal.SIGINT, True, ("--num-workers", "2"))],
                         ids=["SIGTERM", "SIGINT-to-the-group-with-data-workers"])
def test_a_stop_signal_finishes_the_iteration_saves_and_exits_0(tmp_path, sig, to_group, extra):
    status, stdout, stderr = _signalled_run(tmp_path, sig, extra=extra, to_group=to_group)
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    last = _last_iteration(stdout)
    assert f"exiting after iteration {last}: received {sig.name}" in stdout
    assert int((tmp_path / "ckpt" / MARKER).read_text()) == last


@pytest.mark.slow
@pytest.mark.distributed
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    status, stdout, stderr = _signalled_run(tmp_path, signal.SIGTERM, nproc=2)
    assert status == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    last = _last_iteration(stdout)  # printed by rank 1, which got no signal
    assert f"exiting after iteration {last}: received a stop signal on another rank" in stdout
    directory = tmp_path / "ckpt" / f"iter_{last:07d}"
    assert int((tmp_path / "ckpt" / MARKER).read_text()) == last
    assert sorted(p.name for p in (directory / "mp_rank_00").iterdir()) == ["model_optim_rng.pt"]


@pytest.mark.slow
def test_the_time_limit_saves_and_exits_0(tmp_path):
    save = tmp_path / "ckpt"
    result = run_train(TINY + ["--train-iters", "50", "--save", str(save), "--exit-duration-in-mins", "0.0001"])
    assert len(losses(result)) == 1
    assert "exiting after iteration 1: --exit-duration-in-mins 0.0001 reached" in result.stdout
    assert (save / MARKER).read_text() == "1"


# ---- checkpoints: checksums, the saved model, the schedule, a finished run -----------------------

@pytest.fixture(scope="module")
def checkpoint_at_2(tmp_path_factory):
    """A --train-iters 4 run stopped by --exit-interval 2: its checkpoint at iteration 2."""
    save = tmp_path_factory.mktemp("faults") / "ckpt"
    losses(run_train(TINY + ["--train-iters", "4", "--exit-interval", "2", "--save", str(save)]))
    return save


@pytest.fixture
def resumable(checkpoint_at_2, tmp_path):
    """A copy of the iteration-2 checkpoint."""
    return Path(shutil.copytree(checkpoint_at_2, tmp_path / "ckpt"))


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_manifest_checksums_every_file(checkpoint_at_2):
    import json

    directory = checkpoint_at_2 / "iter_0000002"
    files = json.loads((directory / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, entry in files.items():
        assert entry == {"bytes": (directory / name).stat().st_size,
                         "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest()}


@pytest.mark.slow
def test_flipped_bytes_in_a_checkpoint_file_are_one_line_naming_it(resumable):
    model_file = resumable / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(model_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    model_file.write_bytes(data)
    result = run_train(TINY + ["--train-iters", "4", "--load", str(resumable)], timeout=120)
    assert result.returncode == 1
    assert last_error_line(result) == f"mm-train: error: {model_file} is corrupt: its SHA-256 differs from the one " \
                                      "in manifest.json"


@pytest.mark.slow
@pytest.mark.parametrize("finetune", [False, True], ids=["resume", "finetune"])
def test_another_model_over_the_same_shapes_is_refused(resumable, finetune):
    flags = ["--num-attention-heads", "8", "--train-iters", "4", "--load", str(resumable)]
    result = run_train(TINY + flags + (["--finetune"] if finetune else []), timeout=120)
    assert result.returncode == 1
    assert last_error_line(result) == (f"mm-train: error: {resumable / 'iter_0000002'} holds another model than "
                                       "this run builds: --num-attention-heads 4 in the checkpoint, "
                                       "--num-attention-heads 8 now")


def test_what_a_checkpoint_fixes_and_what_may_change():
    saved = run_config([]).record()
    assert model_differences(saved, run_config(["--hidden-dropout", "0.3", "--seq-length", "32",
                                                "--lr", "1"]).record()) == []
    assert model_differences(saved, run_config(["--rotary-base", "500"]).record()) == [
        "--rotary-base 10000 in the checkpoint, --rotary-base 500 now"]
    assert model_differences(saved, run_config(["--num-experts", "4"]).record()) == [
        "no --num-experts in the checkpoint, --num-experts 4 now"]
    no_swiglu = build_config(parse_args([f for f in TINY if f != "--swiglu"] + ["--ffn-hidden-size", "192"]),
                             ONE_PROCESS).record()
    assert model_differences(saved, no_swiglu) == ["--swiglu in the checkpoint, no --swiglu now"]


@pytest.mark.slow
def test_finetune_starts_at_0_with_its_own_schedule(resumable):
    result = run_train(TINY + ["--finetune", "--train-iters", "3", "--lr", "5e-4", "--load", str(resumable)],
                       timeout=120)
    assert len(losses(result)) == 3 and " iteration        1/       3 |" in result.stdout


@pytest.mark.slow
def test_a_longer_schedule_is_refused_naming_the_flag(resumable):
    result = run_train(TINY + ["--train-iters", "6", "--load", str(resumable)], timeout=120)
    assert result.returncode == 1
    assert last_error_line(result).startswith(
        "mm-train: error: this run's learning-rate schedule differs from the checkpoint's: --train-iters 4 in the "
        "checkpoint, 6 now")


def _schedule_lrs(flags: list[str], steps: range) -> list[float]:
    """The learning rate after each of ``steps`` iterations of the schedule of TINY + ``flags``."""
    config = run_config(flags)
    optimizer = SimpleNamespace(param_groups=[{"lr_mult": 1.0, "wd_mult": 1.0}])
    scheduler = build_scheduler(config.optimizer, config.training, optimizer)
    lrs = []
    for step in range(1, steps.stop):
        scheduler.step(config.training.global_batch_size)
        if step in steps:
            lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
def test_override_continues_with_this_runs_schedule(resumable):
    result = run_train(TINY + ["--train-iters", "6", "--override-opt_param-scheduler", "--load", str(resumable)],
                       timeout=120)
    assert len(losses(result)) == 4
    logged = [float(value) for value in LEARNING_RATE.findall(result.stdout)]
    np.testing.assert_allclose(logged, _schedule_lrs(["--train-iters", "6"], range(3, 7)), rtol=1e-6)


def _saved_schedule(flags: list[str]) -> dict:
    config = run_config(flags)
    optimizer = SimpleNamespace(param_groups=[{"lr_mult": 1.0, "wd_mult": 1.0}])
    scheduler = build_scheduler(config.optimizer, config.training, optimizer)
    scheduler.step(2 * config.training.global_batch_size)
    return scheduler.state_dict()


def _loaded_scheduler(flags: list[str], saved: dict):
    config = run_config(flags)
    optimizer = SimpleNamespace(param_groups=[{"lr_mult": 1.0, "wd_mult": 1.0}])
    scheduler = build_scheduler(config.optimizer, config.training, optimizer)
    scheduler.load_state_dict(saved)
    return scheduler, optimizer


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", "16"], "--global-batch-size 8 in the checkpoint, 16 now"),
    (["--lr", "2e-3"], "--lr 0.001 in the checkpoint, 0.002 now"),
    (["--min-lr", "0"], "--min-lr 0.0001 in the checkpoint, 0.0 now"),
    (["--lr-warmup-fraction", "0.2"], "--lr-warmup-fraction 0.1 in the checkpoint, 0.2 now"),
    (["--lr-decay-style", "linear"], "--lr-decay-style cosine in the checkpoint, linear now"),
    (["--weight-decay", "0.1"], "--weight-decay 0.01 in the checkpoint, 0.1 now"),
])
def test_each_schedule_flag_that_differs_is_named(flags, message):
    saved = _saved_schedule(["--train-iters", "40"])
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _loaded_scheduler(["--train-iters", "40", *flags], saved)


def test_use_checkpoint_keeps_the_checkpoints_schedule():
    saved = _saved_schedule(["--train-iters", "40"])
    scheduler, optimizer = _loaded_scheduler(["--train-iters", "80", "--use-checkpoint-opt_param-scheduler"], saved)
    assert scheduler.lr_decay_steps == saved["lr_decay_steps"] and scheduler.num_steps == 16
    overriding, _ = _loaded_scheduler(["--train-iters", "80", "--override-opt-param-scheduler"], saved)
    assert overriding.lr_decay_steps == 2 * saved["lr_decay_steps"] and overriding.num_steps == 16


def test_both_schedule_choices_are_refused(capsys):
    err = one_line_refusal(TINY + ["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], capsys)
    assert "are mutually exclusive" in err


@pytest.mark.slow
@pytest.mark.parametrize("train_iters", [2, 1])
def test_a_finished_run_says_so_and_rewrites_nothing(resumable, train_iters):
    before = _tree_digest(resumable)
    result = run_train(TINY + ["--train-iters", str(train_iters), "--load", str(resumable), "--save", str(resumable)],
                       timeout=120)
    assert result.returncode == 0
    assert (f"mm-train: training is already complete: {resumable} holds iteration 2, --train-iters is {train_iters}"
            in result.stdout)
    assert _tree_digest(resumable) == before


# ---- dropout across a resume ---------------------------------------------------------------------

@pytest.mark.slow
def test_dropout_resumes_exactly(tmp_path):
    flags = TINY + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--train-iters", "6"]
    save = tmp_path / "ckpt"
    uninterrupted = losses(run_train(flags + ["--save", str(save), "--save-interval", "3"]))
    (save / MARKER).write_text("3")
    assert losses(run_train(flags + ["--load", str(save)])) == uninterrupted[3:]


# ---- flags refused at start-up -------------------------------------------------------------------

def test_experts_with_linear_biases_are_refused(capsys):
    with_biases = [flag for flag in TINY if flag != "--disable-bias-linear"]
    for activation in (["--swiglu"], []):
        flags = [flag for flag in with_biases if flag != "--swiglu"] + activation + ["--num-experts", "4"]
        assert "--num-experts needs --disable-bias-linear" in one_line_refusal(flags, capsys)


@pytest.mark.parametrize("flag, value, wanted", [
    ("--hidden-size", "0", "an integer >= 1"),
    ("--num-layers", "0", "an integer >= 1"),
    ("--seq-length", "0", "an integer >= 1"),
    ("--num-attention-heads", "-2", "an integer >= 1"),
    ("--ffn-hidden-size", "0", "an integer >= 1"),
    ("--micro-batch-size", "0", "an integer >= 1"),
    ("--global-batch-size", "0", "an integer >= 1"),
    ("--train-iters", "0", "an integer >= 1"),
    ("--eval-iters", "-1", "an integer >= 0"),
    ("--num-workers", "-1", "an integer >= 0"),
    ("--seed", "-1", "an integer in [0, 2147483647]"),
    ("--hidden-dropout", "1.5", "a number in [0, 1)"),
    ("--attention-dropout", "1", "a number in [0, 1)"),
    ("--lr", "-0.001", "a number >= 0"),
    ("--lr", "nan", "a number >= 0"),
    ("--adam-beta2", "1", "a number in [0, 1)"),
    ("--norm-epsilon", "0", "a number > 0"),
    ("--rotary-percent", "0", "a number in (0, 1]"),
    ("--initial-loss-scale", "0", "a number > 0"),
    ("--hysteresis", "0", "an integer >= 1"),
    ("--exit-duration-in-mins", "0", "a number > 0"),
    ("--tensor-model-parallel-size", "0", "an integer >= 1"),
    ("--context-parallel-size", "x", "an integer >= 1"),
])
def test_out_of_range_numbers_are_one_line_exit_2(capsys, flag, value, wanted):
    err = one_line_refusal(TINY + [flag, value], capsys)
    assert f"argument {flag}: must be {wanted}, got '{value}'" in err


def test_every_numeric_flag_has_a_range():
    loose = [action.option_strings[0] for action in build_parser()._actions if action.type in (int, float)]
    assert not loose, f"numeric flags without a range: {loose}"


def test_a_missing_required_flag_is_one_line(capsys):
    assert "the following arguments are required: --seq-length" in one_line_refusal(
        TINY[:TINY.index("--seq-length")] + TINY[TINY.index("--seq-length") + 2:], capsys)


# ---- data files ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_missing_data_path_is_one_line_exit_1():
    result = run_train(TINY + ["--train-iters", "2", "--data-path", "/nonexistent/corpus_text_document"], timeout=120)
    assert result.returncode == 1
    assert last_error_line(result) == (
        "mm-train: error: --data-path /nonexistent/corpus_text_document: /nonexistent/corpus_text_document.idx and "
        "/nonexistent/corpus_text_document.bin not found (build them with mm-preprocess)")


@pytest.fixture
def indexed(tmp_path) -> str:
    """A 5-document uint16 indexed dataset: 34-byte header + 5 x 12 + 6 x 8 = 142 bytes of .idx, 120 of .bin."""
    module = indexed_dataset_module()
    prefix = str(tmp_path / "docs")
    builder = module.IndexedDatasetBuilder(module.get_bin_path(prefix), dtype=np.uint16)
    for length in range(10, 15):
        builder.add_document(np.arange(length), [length])
    builder.finalize(module.get_idx_path(prefix))
    check_indexed_files(prefix)
    return prefix


@pytest.mark.parametrize("damage, message", [
    (lambda p: open(p + ".idx", "r+b").truncate(0), "docs.idx is empty: not even the 34-byte header of an index"),
    (lambda p: open(p + ".idx", "r+b").truncate(20), "docs.idx is truncated (20 bytes): not even the 34-byte header"),
    (lambda p: open(p + ".idx", "r+b").truncate(100), "docs.idx is truncated: 100 bytes, its header announces 142"),
    (lambda p: open(p + ".bin", "r+b").truncate(100), "docs.bin is truncated: 100 bytes, its index needs 120"),
    (lambda p: open(p + ".bin", "r+b").truncate(0), "docs.bin is truncated: 0 bytes, its index needs 120"),
    (lambda p: Path(p + ".idx").write_bytes(b"x" * 200), "docs.idx is not a Megatron index file"),
    (lambda p: os.remove(p + ".bin"), "docs.bin not found (build them with mm-preprocess)"),
], ids=["empty idx", "idx shorter than its header", "truncated idx", "truncated bin", "empty bin", "not an index",
        "missing bin"])
def test_damaged_data_files_are_named_when_the_dataset_opens(indexed, damage, message):
    damage(indexed)
    with pytest.raises(DataError, match=re.escape(message)):
        check_indexed_files(indexed)


# ---- context-parallel attention with bad inputs on one rank --------------------------------------

BAD_CP_CASES = [(algo, bad) for algo in (ULYSSES, RING) for bad in ("invalid", "different length")]


def _one_bad_rank(rank: int, world_size: int) -> dict:
    """For each case, rank 1 passes bad inputs and rank 0 good ones; returns each rank's error and how
    long it took to come."""
    outcomes = {}
    for algo, bad in BAD_CP_CASES:
        q = torch.randn(1, 4, 2, 8)
        if rank == 1 and bad == "invalid":
            q = q[..., :4]  # head dim of q differs from k's: rank 1's own check fails
        if rank == 1 and bad == "different length":
            q = torch.randn(1, 6, 2, 8)  # valid alone, but another sequence piece than rank 0's
        k = torch.randn(1, q.shape[1], 2, 8)
        start = time.monotonic()
        try:
            cp_attention(q, k, k.clone(), algo, None)
            outcomes[algo, bad] = ("no error", 0.0)
        except ValueError as error:
            outcomes[algo, bad] = (str(error), time.monotonic() - start)
    return outcomes


@pytest.mark.distributed
def test_bad_inputs_on_one_rank_raise_on_every_rank_at_once():
    ranks = run_ranks(_one_bad_rank, 2, timeout=300, collective_timeout=60)
    for algo, bad in BAD_CP_CASES:
        (good_error, good_seconds), (bad_error, bad_seconds) = (outcomes[algo, bad] for outcomes in ranks)
        assert max(good_seconds, bad_seconds) < 20, f"{algo} {bad}: a rank waited for its peer"
        if bad == "invalid":
            assert good_error.startswith("cp_attention: rank 1 of the context-parallel group got invalid inputs")
            assert bad_error.startswith("k must have shape [B=1, Sk, Hkv, D=4]")
        else:
            for error in (good_error, bad_error):
                assert "passed different local sequence length S_locals (4 to 6)" in error, error
