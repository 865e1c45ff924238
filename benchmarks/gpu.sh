#!/usr/bin/env bash
# For a machine with a CUDA GPU (after scripts/setup.sh, with triton installed):
#   1. runs the Triton kernel tests on the GPU (compiled, not interpreted);
#   2. benchmarks every kernel module of mm_kernels.bench (Triton backend vs eager PyTorch and
#      torch.compile) in bf16 and fp16, writing a table, JSON and a PNG plot;
#   3. times Hugging Face training steps with and without the fused kernels (mm-bench hf);
#   4. runs mm-train's one-process fault tests on the GPU (fp16 loss scaling, the NaN stop, stop
#      signals and the time limit, whose agreement all-reduce then runs on NCCL);
#   5. trains the tiny GPT on the GPU with the fused kernels and compares its loss curve with the CPU's
#      (benchmarks/gpu_train_check.py: 'gpu-train: ...' lines, logs in OUTPUT_DIR).
# Usage: bash benchmarks/gpu.sh [OUTPUT_DIR]   (default runs/gpu-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
out=${1:-runs/gpu-bench}
mkdir -p "$out"
# tests/conftest.py turns the interpreter on only without CUDA; make sure nothing forces it here.
unset TRITON_INTERPRET MM_KERNELS_BACKEND
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA GPU visible')"
python -c "import triton" || { echo "gpu.sh: triton is not installed (pip install 'mm-kernels[gpu]')" >&2; exit 1; }
python -m mm_kernels info | tee "$out/info.txt"
python -m pytest -q -p no:cacheprovider -m triton tests | tee "$out/tests.txt"
python -m mm_kernels.bench.cli all --device cuda --dtype bf16,fp16 \
  --json "$out/bench.json" --plot "$out/bench.png" | tee "$out/bench.txt"
# Hugging Face training steps with and without the fused kernels on the GPU: the equivalence probe, the
# Triton kernels and the experts' grouped matmuls run on CUDA; both variants' loss columns should agree.
python -m mm_kernels.bench.cli hf --device cuda --model llama qwen3_moe qwen2_5_vl \
  --json "$out/hf.json" | tee "$out/hf.txt"
python -m pytest -q -p no:cacheprovider tests/test_train_faults.py -m slow \
  -k "fp16 or diverging or stop_signal or time_limit" | tee "$out/trainer-faults.txt"
python benchmarks/gpu_train_check.py "$out" | tee "$out/train.txt"
echo "gpu.sh: results in $out"
