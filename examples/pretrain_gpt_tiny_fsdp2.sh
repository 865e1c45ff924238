#!/bin/bash
# The tiny GPT of pretrain_gpt_tiny.sh trained with torch FSDP2 (settings in fsdp2_config.yaml):
# parameters, gradients and optimizer state sharded over all processes, the model built on the
# meta device, sharded torch_dcp checkpoints (resume with --load at the same or another world size).
# Takes the same overrides as pretrain_gpt_tiny.sh.
set -euo pipefail
EXAMPLES=$(dirname "$0")

export PARALLEL_ARGS="
    --use-torch-fsdp2 \
    --fsdp2-config-path ${EXAMPLES}/fsdp2_config.yaml \
    --use-cpu-initialization \
    --init-model-with-meta-device
"
export CKPT_FORMAT=torch_dcp
export MOE_ARGS=""  # MoE is not supported with FSDP2 yet
export CKPT_DIR=${CKPT_DIR:-./ckpt/gpt_tiny_fsdp2}

exec bash "${EXAMPLES}/pretrain_gpt_tiny.sh"
