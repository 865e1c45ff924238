#!/bin/bash
# Tiny GPT pre-training in MindSpeed-MM's launch-script shape: 2 processes, data parallel with the
# distributed optimizer, a 4-expert MoE split over both (expert parallel), fused RMSNorm, SwiGLU and
# MoE permute, the shipped corpus and byte tokenizer. Runs on CPU (gloo) in well under a minute; on
# NPU/GPU set NPUS_PER_NODE to the devices per node.
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, CKPT_DIR,
# PARALLEL_ARGS (how the model is distributed), MOE_ARGS (empty for a dense model),
# CKPT_FORMAT (torch | torch_dcp);
# pretrain_gpt_tiny_fsdp2.sh sets the last two for FSDP2.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-20}
CKPT_DIR=${CKPT_DIR:-./ckpt/gpt_tiny}
CKPT_FORMAT=${CKPT_FORMAT:-torch}
PARALLEL_ARGS=${PARALLEL_ARGS:-"--use-distributed-optimizer --overlap-grad-reduce"}

TP=1
PP=1

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    ${PARALLEL_ARGS} \
    --num-layers 2 \
    --hidden-size 64 \
    --num-attention-heads 4 \
    --seq-length 64 \
    --max-position-embeddings 64 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --disable-bias-linear \
    --hidden-dropout 0 \
    --attention-dropout 0 \
    --micro-batch-size 2 \
    --global-batch-size 8 \
    --train-iters ${TRAIN_ITERS} \
    --lr 1e-3 \
    --min-lr 1e-4 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.1 \
    --weight-decay 0.01 \
    --weight-decay-exclude-modules word_embeddings \
    --clip-grad 1.0 \
    --seed 1234 \
    --num-workers 0
"

# 4 experts, top-2 routing, split over the 2 processes (expert parallel), fused permute/unpermute.
MOE_ARGS=${MOE_ARGS-"
    --num-experts 4 \
    --moe-router-topk 2 \
    --moe-token-dispatcher-type alltoall \
    --moe-permute-fusion \
    --moe-aux-loss-coeff 0.01 \
    --expert-model-parallel-size 2
"}

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 2 \
    --ckpt-format ${CKPT_FORMAT} \
    --save ${CKPT_DIR}
"

torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $MOE_ARGS \
    $OUTPUT_ARGS
