#!/usr/bin/env bash
# For a machine with a CUDA GPU and triton: runs from the source tree (the C++ extension is not needed).
#   1. the Triton tests of tests/ compiled on the GPU (when pytest is installed);
#   2. benchmarks/gpu_check.py: every kernel against the reference on the GPU, values and gradients,
#      deterministic weight gradients, MoE without host syncs and in a CUDA graph;
#   3. mm-bench rmsnorm, swiglu and moe on the GPU in bf16: ours, eager PyTorch, torch.compile and
#      Liger-Kernel (when installed), fwd and bwd, GB/s against the copy bandwidth of the same run;
#   4. Hugging Face training steps with and without the fused kernels (mm-bench hf, when transformers
#      is installed): the equivalence probe, the Triton kernels and the experts' grouped matmuls on CUDA;
#   5. mm-train's one-process fault tests on the GPU (fp16 loss scaling, the NaN stop, stop signals and
#      the time limit, whose agreement all-reduce then runs on NCCL), when pytest is installed;
#   6. benchmarks/gpu_train_check.py: the tiny GPT trained on the GPU with the fused kernels, its loss
#      curve against the CPU's ('gpu-train: ...' lines, the runs' logs in OUTPUT_DIR);
#   7. mm-bench train on the GPU (the trainer's speed features one after another, one round), and
#      mm-train with --use-flash-attn and attention dropout (the Triton kernel's fused dropout under
#      megatron's CUDA RNG tracker).
# Each step has a time limit (16 minutes at most in all); a failing step does not
# stop the next ones, and the exit status is 1 if any failed. Logs, tables and JSON go to OUTPUT_DIR.
# Usage: bash benchmarks/gpu.sh [OUTPUT_DIR]   (default runs/gpu-bench); PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=${1:-runs/gpu-bench}
mkdir -p "$out"
# tests/conftest.py turns the interpreter on only without CUDA; make sure nothing forces it here.
unset TRITON_INTERPRET MM_KERNELS_BACKEND
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA GPU visible')" || exit 2
"$PYTHON" -c "import triton" || { echo "gpu.sh: triton is not installed (pip install 'mm-kernels[gpu]')" >&2; exit 2; }
failed=()

step() {  # step NAME SECONDS LOG COMMAND...
  local name=$1 seconds=$2 log=$3
  shift 3
  echo "== $name (at most ${seconds} s)"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee "$out/$log"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start)) s"
  [ "$status" -eq 0 ] || failed+=("$name")
}

step info 30 info.txt "$PYTHON" -m mm_kernels info
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  step "triton tests" 100 tests.txt "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" -m triton \
    tests/test_rms_norm.py tests/test_swiglu.py tests/test_attention.py tests/test_moe.py
else
  echo "== triton tests: pytest is not installed; benchmarks/gpu_check.py covers the kernels"
fi
step "gpu checks" 100 checks.txt "$PYTHON" benchmarks/gpu_check.py
# One step per kernel, so that a time limit reached by one keeps the others' tables.
has_plot=0
"$PYTHON" -c "import matplotlib" 2>/dev/null && has_plot=1
for kernel in rmsnorm swiglu moe; do
  plot=()
  [ "$has_plot" -eq 1 ] && plot=(--plot "$out/bench-$kernel.png")
  step "benchmark $kernel" 80 "bench-$kernel.txt" "$PYTHON" -m mm_kernels.bench.cli "$kernel" --device cuda \
    --dtype bf16 --json "$out/bench-$kernel.json" "${plot[@]}"
done
if "$PYTHON" -c "import transformers" 2>/dev/null; then
  step "hf steps" 90 hf.txt "$PYTHON" -m mm_kernels.bench.cli hf --device cuda --model llama qwen3_moe qwen2_5_vl \
    --json "$out/hf.json"
fi
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  step "trainer faults" 120 trainer-faults.txt "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_train_faults.py -m slow -k "fp16 or diverging or stop_signal or time_limit"
fi
step "trainer on the GPU" 120 train.txt "$PYTHON" benchmarks/gpu_train_check.py "$out"
step "trainer speed" 120 train-speed.txt "$PYTHON" -m mm_kernels.bench.cli train --rounds 1 --json "$out/train.json"
step "trainer flash dropout" 60 train-dropout.txt "$PYTHON" -m mm_train --num-layers 2 --hidden-size 64 \
  --num-attention-heads 4 --num-query-groups 2 --seq-length 128 --micro-batch-size 2 --global-batch-size 4 --bf16 \
  --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear --attention-dropout 0.1 \
  --use-flash-attn --train-iters 5 --log-interval 1 --num-workers 0
echo "gpu.sh: results in $out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
