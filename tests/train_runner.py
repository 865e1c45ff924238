"""Runs mm-train in subprocesses (one process, or several under torchrun on gloo) and reads its log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
LOSS = re.compile(r"\| lm loss: ([0-9.E+\-]+) \|")
GRAD_NORM = re.compile(r"\| grad norm: ([0-9.]+) \|")

# Tiny fp32 GPT on the shipped corpus; dropout off and one padded vocabulary for every TP size,
# so runs at different parallel layouts compute the same model.
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 2 "
        "--global-batch-size 8 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.1 "
        "--normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear "
        "--hidden-dropout 0 --attention-dropout 0 --make-vocab-size-divisible-by 256 --log-interval 1 "
        "--num-workers 0").split()


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "mm_train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "mm_train", *args]


def _environment(env: dict | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}


def run_train(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None, cwd: Path = ROOT):
    """Runs ``python -m mm_train args`` in ``cwd`` (under torchrun when nproc > 1); returns the CompletedProcess."""
    return subprocess.run(_command(args, nproc), cwd=cwd, env=_environment(env), capture_output=True, text=True,
                          timeout=timeout)


def start_train(args: list[str], nproc: int = 1, **popen) -> subprocess.Popen:
    """Starts ``python -m mm_train args`` (under torchrun when nproc > 1), stdout and stderr piped as text
    unless ``popen`` (more subprocess.Popen arguments) says otherwise."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(_command(args, nproc), cwd=ROOT, env=_environment(None), **options)


def losses(result) -> list[float]:
    """The ``lm loss`` of every logged iteration; raises with the log tail when the run failed."""
    if result.returncode != 0:
        raise AssertionError(f"mm-train exited {result.returncode}:\n{result.stderr[-3000:]}")
    return [float(value) for value in LOSS.findall(result.stdout)]


def rel_close(actual: list[float], expected: list[float], rtol: float) -> None:
    """Asserts two per-iteration curves have the same length and agree within ``rtol`` relative."""
    assert len(actual) == len(expected), f"{len(actual)} logged iterations, expected {len(expected)}"
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        assert abs(a - e) <= rtol * abs(e), f"iteration {step}: {a} vs {e} (rtol {rtol})"


def grad_norms(result) -> list[float]:
    """The ``grad norm`` (before clipping) of every logged iteration; raises when the run failed."""
    losses(result)
    return [float(value) for value in GRAD_NORM.findall(result.stdout)]

