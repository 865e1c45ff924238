#!/bin/bash
# The tiny Qwen2.5-VL fine-tune of finetune_tiny_qwen25vl.yaml in MindSpeed-MM's pretrain_vlm
# launch-script shape (--mm-model / --mm-data JSON files): 2 processes sharding the model with FSDP2
# (the multimodal path always does; the sizes come from the model JSON, not GPT_ARGS). Build the
# model and data first: python -m mm_train.tiny_vlm
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, CKPT_DIR, CP
# (context parallel size: 2 splits each sequence's text decoder over both processes with Ulysses).
set -euo pipefail
EXAMPLES=$(dirname "$0")

NPUS_PER_NODE=${NPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-100}
CKPT_DIR=${CKPT_DIR:-./ckpt/tiny_qwen25vl_json}
CP=${CP:-1}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

MM_ARGS="
    --mm-data ${EXAMPLES}/finetune_tiny_qwen25vl_data.json \
    --mm-model ${EXAMPLES}/finetune_tiny_qwen25vl_model.json
"

GPT_ARGS="
    --use-torch-fsdp2 \
    --fsdp2-config-path ${EXAMPLES}/fsdp2_config_vlm.yaml \
    --use-cpu-initialization \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --seq-length 64 \
    --micro-batch-size 8 \
    --global-batch-size 16 \
    --train-iters ${TRAIN_ITERS} \
    --lr 3e-3 \
    --min-lr 3e-4 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.1 \
    --weight-decay 0 \
    --clip-grad 1.0 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --seed 42 \
    --num-workers 0
"

OUTPUT_ARGS="
    --log-interval 10 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 4 \
    --ckpt-format torch_dcp \
    --save ${CKPT_DIR}
"

torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS
