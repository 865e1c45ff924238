#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then trains a tiny GPT for 60 iterations on the corpus that ships
# with the package, with the fused RMSNorm and SwiGLU kernels on. Extra arguments are passed to
# mm-train (e.g. --save runs/tiny). Under 2 minutes on 2 CPU cores; the loss falls from ~5 to ~3.4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec mm-train \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters 60 \
  --lr 2e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  --normalization RMSNorm --swiglu --use-fused-rmsnorm --use-fused-swiglu \
  --position-embedding-type rope --disable-bias-linear --hidden-dropout 0 --attention-dropout 0 \
  --log-interval 10 --num-workers 0 "$@"
