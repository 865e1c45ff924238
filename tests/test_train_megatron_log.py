"""mm-train's log as Megatron-LM writes it: the iteration line's timing (evaluation and saving left out,
the first iteration's line), and MindSpeed-MM's own post-processing pipelines run on a real log."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from mm_train.checkpoint.state import TrainingState
from mm_train.cli import parse_args
from mm_train.config import build_config
from mm_train.engines.base import Engine, StepResult
from mm_train.features.resilience import RunGuard
from mm_train.launch import Launch
from mm_train.loop import train
from tests.train_runner import TINY, losses, run_train

ONE_PROCESS = Launch(rank=0, world_size=1, local_rank=0, device_type="cpu")
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+) \|")
STAMP = re.compile(r"^ \[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})\] iteration +(\d+)/")


class SleepingEngine(Engine):
    """An engine whose steps, evaluations and saves only sleep: the loop's clock is all that is measured."""

    def __init__(self, step: float, evaluate: float, save: float) -> None:
        self.seconds = {"step": step, "evaluate": evaluate, "save": save}
        self.saved: list[int] = []

    def load(self) -> TrainingState:
        return TrainingState()

    def data(self, state):
        return iter(()), iter(())

    def train_step(self, data) -> StepResult:
        time.sleep(self.seconds["step"])
        return StepResult(loss=2.0, grad_norm=1.0, updated=True, tokens=8 * 64, loss_scale=4096.0)

    def evaluate(self, data, iterations: int) -> float:
        time.sleep(self.seconds["evaluate"])
        return 2.0

    def learning_rate(self) -> float:
        return 1e-3

    def floating_point_operations(self) -> float:
        return 3e12

    def save(self, state: TrainingState) -> Path:
        time.sleep(self.seconds["save"])
        self.saved.append(state.iteration)
        return Path(".")

    def close(self) -> None:
        pass


def run_loop(capsys, flags: list[str], engine: Engine) -> list[str]:
    """The loop's output for ``engine`` (no process group: the guard's NaN check, a collective, is off)."""
    config = build_config(parse_args(TINY + flags + ["--no-check-for-nan-in-loss-and-grad"]), ONE_PROCESS)
    guard = RunGuard(config.resilience)
    try:
        train(engine, config, engine.load(), guard)
    finally:
        guard.close()
    return capsys.readouterr().out.splitlines()


def test_interval_time_leaves_out_evaluation_and_saving(capsys, tmp_path):
    engine = SleepingEngine(step=0.02, evaluate=0.3, save=0.3)
    out = run_loop(capsys, ["--train-iters", "4", "--log-interval", "1", "--eval-interval", "1", "--eval-iters", "1",
                            "--save", str(tmp_path), "--save-interval", "1", "--log-throughput", "--log-tps"], engine)
    lines = [line for line in out if "elapsed time per iteration" in line]
    assert len(lines) == 4 and engine.saved == [1, 2, 3, 4]
    for line in lines:
        elapsed = float(ELAPSED.search(line).group(1))
        assert 20.0 <= elapsed < 150.0, line  # the 0.6 s of evaluation and saving are not in it
        assert "| tokens per sample: 6.400000E+01 | lm loss: 2.000000E+00 | loss scale: 4096.0 | grad norm: 1.000 |" \
            in line
        throughput = float(re.search(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+) \|", line).group(1))
        assert throughput == pytest.approx(3.0 / (elapsed / 1000.0), rel=0.06)
    stamps = [datetime.fromisoformat(STAMP.match(line).group(1)) for line in lines]
    assert (stamps[1] - stamps[0]).total_seconds() > 0.5  # yet the wall clock went on during them


def test_first_iteration_line_then_interval_means(capsys):
    out = run_loop(capsys, ["--train-iters", "7", "--log-interval", "3"], SleepingEngine(0.01, 0.0, 0.0))
    iterations = [int(STAMP.match(line).group(2)) for line in out if STAMP.match(line)]
    assert iterations == [1, 3, 6]


# MindSpeed-MM's post-processing, exactly as its launch scripts run it on their training log.
STEP_TIME = ("""grep "elapsed time per iteration" {log} | awk -F ':' '{{print$5}}' | awk -F '|' '{{print$1}}' | """
             """head -n 150 | tail -n 100 | awk '{{sum+=$1}} END {{if (NR != 0) printf("%.1f",sum/NR)}}'""")
STEP_TIME_BY_NAME = ("""grep "elapsed time per iteration" {log} | awk -F 'elapsed time per iteration [(]ms[)]:' """
                     """'{{print$2}}' | awk -F '|' '{{print$1}}' | head -n 200 | tail -n 100 | """
                     """awk '{{sum+=$1}} END {{if (NR != 0) printf("%.1f",sum/NR)}}'""")
GBS = ("""grep "consumed samples:" {log} | tail -n 1 | awk -F '|' '{{split($1, a, "iteration"); split(a[2], b, "/"); """
       """iter=b[1]+0; split($2, c, ":"); samp=c[2]+0; if(iter!=0) printf("%.2f", samp/iter); else print "N/A"}}'""")
TOKENS = ("""grep "tokens per sample" {log} | awk -F 'tokens per sample:' '{{print$2}}' | awk -F '|' '{{print$1}}' | """
          """head -n 150 | tail -n 100 | awk '{{sum+=$1}} END {{if (NR != 0) printf("%.1f",sum/NR)}}'""")


def _shell(pipeline: str, log: Path) -> str:
    return subprocess.run(["bash", "-c", pipeline.format(log=log)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def training_log(tmp_path_factory) -> Path:
    """The log of a real 2-process run (stdout and stderr, as `2>&1 | tee` writes it), with evaluation and
    checkpoints between some iterations and a resume half-way."""
    directory = tmp_path_factory.mktemp("log")
    flags = TINY + ["--train-iters", "8", "--log-tps", "--eval-interval", "3", "--eval-iters", "2", "--save",
                    str(directory / "ckpt"), "--save-interval", "3"]
    first = run_train(flags + ["--exit-interval", "3"], nproc=2)
    second = run_train(flags + ["--load", str(directory / "ckpt")], nproc=2)
    losses(first), losses(second)
    log = directory / "train.log"
    log.write_text(first.stdout + first.stderr + second.stdout + second.stderr)
    return log


def test_mindspeed_mm_post_processing_reads_the_true_figures(training_log):
    lines = [line for line in training_log.read_text().splitlines() if "elapsed time per iteration" in line]
    assert [int(STAMP.match(line).group(2)) for line in lines] == list(range(1, 9))
    elapsed = [float(ELAPSED.search(line).group(1)) for line in lines]
    assert _shell(STEP_TIME, training_log) == f"{sum(elapsed) / len(elapsed):.1f}"
    assert _shell(STEP_TIME_BY_NAME, training_log) == _shell(STEP_TIME, training_log)
    assert _shell(GBS, training_log) == "8.00"  # consumed samples count across the resume
    assert _shell(TOKENS, training_log) == "64.0"  # packed samples: every token of --seq-length 64 counts
    # the step time is the wall time between two iteration lines with nothing else between them
    stamps = [datetime.fromisoformat(STAMP.match(line).group(1)) for line in lines]
    text = training_log.read_text()
    for index in (1, 4, 7):  # iterations 2, 5 and 8 follow a plain training iteration
        wall_ms = (stamps[index] - stamps[index - 1]).total_seconds() * 1000.0
        assert elapsed[index] <= wall_ms + 1.0 and elapsed[index] >= 0.5 * wall_ms - 5.0, (index, elapsed, wall_ms)
    assert "saving checkpoint at iteration       3 to" in text and " loading checkpoint from " in text
