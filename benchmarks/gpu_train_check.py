"""The trainer on one CUDA GPU, checked against the CPU (part of benchmarks/gpu.sh; 2 to 4 minutes).

    python benchmarks/gpu_train_check.py [OUTPUT_DIR]

Runs mm-train from the source tree (``PYTHONPATH=.``; the C++ extension is not needed) on the tiny
fp32 GPT of the tests with the fused RMSNorm and SwiGLU, and checks:

1. ``cpu-reference``: 30 iterations on the CPU (CUDA hidden), gloo, the CPU adaptor;
2. ``cuda-fused``: the same 30 iterations on the GPU with ``--distributed-backend nccl``: every loss
   within 2e-3 (relative) of the CPU's, the fused kernels called on CUDA tensors, CUDA memory used;
3. ``cuda-resume``: with the distributed optimizer, saved at iteration 15 (``--ckpt-format torch``:
   Megatron-LM's files and ``distrib_optim.pt``) and resumed: the same losses as the uninterrupted run
   (1e-5) - RNG tracker, optimizer and data position restored;
4. ``cuda-moe-bf16``: a bf16 MoE (4 experts, top-2, alltoall, fused permute and SwiGLU in the
   experts) for 30 iterations: finite losses that fall, the fused SwiGLU called in the experts;
5. ``cuda-transformer-engine`` (only when Transformer Engine is installed): 10 iterations with
   ``--transformer-impl transformer_engine``, finite losses.

Each run's log is written to OUTPUT_DIR (default runs/gpu-bench); one ``gpu-train: ...`` line per check
says what was measured, and the exit status is 1 if any check failed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.train_runner import LOSS, ROOT, TINY

ITERS = 30
FUSED = [*TINY, "--use-fused-rmsnorm", "--use-fused-swiglu"]
MOE = ("--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall --moe-permute-fusion "
       "--moe-aux-loss-coeff 0.01 --moe-layer-freq -1 --first-k-dense-replace -1 --bf16").split()

# Runs mm-train in this process with the fused kernels counted, then prints what it saw.
RUNNER = """
import json, sys, torch
import mm_kernels, mm_kernels.nn.rms_norm as norm_module
calls = {"swiglu": 0, "swiglu_cuda": 0, "rms_norm": 0, "rms_norm_cuda": 0}
def counted(name, function):
    def wrapper(x, *args, **kwargs):
        calls[name] += 1
        calls[name + "_cuda"] += int(x.is_cuda)
        return function(x, *args, **kwargs)
    return wrapper
mm_kernels.swiglu = counted("swiglu", mm_kernels.swiglu)
norm_module.rms_norm = counted("rms_norm", norm_module.rms_norm)
from mm_train.cli import main
status = main(sys.argv[1:])
calls["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("gpu-train-calls: " + json.dumps(calls), flush=True)
sys.exit(status)
"""


def run(name: str, flags: list[str], out: Path, cuda: bool = True) -> tuple[list[float], dict, str]:
    """One mm-train run (its log in out/name.log): losses, fused-kernel counts, and the whole log."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", RUNNER, *flags], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    (out / f"{name}.log").write_text(log)
    calls = {}
    for line in result.stdout.splitlines():
        if line.startswith("gpu-train-calls: "):
            calls = json.loads(line.split(": ", 1)[1])
    if result.returncode != 0:
        raise RuntimeError(f"{name} exited {result.returncode}; the end of its log:\n{log[-3000:]}")
    return [float(value) for value in LOSS.findall(result.stdout)], calls, log


def worst_relative(actual: list[float], expected: list[float]) -> float:
    """The largest |a - e| / |e| over the iterations (inf when the curves differ in length)."""
    if len(actual) != len(expected) or not expected:
        return float("inf")
    return max(abs(a - e) / abs(e) for a, e in zip(actual, expected, strict=True))


def main() -> int:
    import torch

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu-bench")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu-train: no CUDA GPU visible")
        return 2
    print(f"gpu-train: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, Transformer Engine "
          f"{'installed' if importlib.util.find_spec('transformer_engine') else 'not installed'}", flush=True)
    failures = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"gpu-train: {name}: {'ok' if ok else 'FAILED'}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    steps = ["--train-iters", str(ITERS)]
    try:
        cpu, _, _ = run("cpu-reference", FUSED + steps, out, cuda=False)
        gpu, calls, log = run("cuda-fused", FUSED + steps + ["--distributed-backend", "nccl"], out)
        worst = worst_relative(gpu, cpu)
        check("cuda-fused vs cpu-reference", worst <= 2e-3 and calls["swiglu_cuda"] > 0 and calls["rms_norm_cuda"] > 0
              and calls["peak_cuda_bytes"] > 0 and "running on gloo" not in log,
              f"{len(gpu)} iterations, loss {gpu[0]:.4f} -> {gpu[-1]:.4f} (cpu {cpu[0]:.4f} -> {cpu[-1]:.4f}), "
              f"worst relative difference {worst:.2e} (limit 2e-3); fused calls on CUDA tensors: swiglu "
              f"{calls['swiglu_cuda']}/{calls['swiglu']}, rms_norm {calls['rms_norm_cuda']}/{calls['rms_norm']}; "
              f"peak CUDA memory {calls['peak_cuda_bytes'] / 2**20:.1f} MiB")
        save, distributed = out / "resume-ckpt", FUSED + steps + ["--use-distributed-optimizer"]
        whole, _, _ = run("cuda-distributed-optimizer", distributed, out)
        first, _, _ = run("cuda-resume-first", distributed + ["--save", str(save), "--save-interval", "15",
                                                              "--exit-interval", "15"], out)
        second, _, log = run("cuda-resume-second", distributed + ["--load", str(save)], out)
        worst = worst_relative(first + second, whole)
        check("cuda-resume", worst <= 1e-5 and "at iteration 15" in log,
              f"saved at 15, resumed: worst relative difference to the uninterrupted run {worst:.2e} (limit 1e-5)")
        moe, calls, _ = run("cuda-moe-bf16", FUSED + steps + MOE, out)
        falls = len(moe) == ITERS and all(value == value for value in moe) and \
            sum(moe[-5:]) / 5 < sum(moe[:5]) / 5 - 0.2
        check("cuda-moe-bf16", falls and calls["swiglu_cuda"] > 0,
              f"loss {moe[0]:.4f} -> {moe[-1]:.4f} over {len(moe)} iterations; fused swiglu calls on CUDA tensors "
              f"{calls['swiglu_cuda']} (experts only: every layer is MoE)")
        if importlib.util.find_spec("transformer_engine") is not None:
            te, _, log = run("cuda-transformer-engine", FUSED + ["--train-iters", "10", "--transformer-impl",
                                                                "transformer_engine"], out)
            check("cuda-transformer-engine", len(te) == 10 and all(value == value for value in te),
                  f"loss {te[0]:.4f} -> {te[-1]:.4f}; notice: "
                  f"{'yes' if 'fused RMSNorm runs' in log else 'no'}")
        else:
            print("gpu-train: cuda-transformer-engine: skipped (Transformer Engine is not installed)")
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        check("runs", False, str(error))
    print(f"gpu-train: logs in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
