#!/bin/bash
# MoE pre-training in the shape of MindSpeed-LLM's Mixtral-8x7B launch script: every layer a top-2 MoE
# (--moe-layer-freq -1 --first-k-dense-replace -1), grouped experts, fused permutation with the
# alltoall_seq dispatcher (megatron-core's alltoall), ring context parallel, distributed optimizer.
# Every flag as the real script has it, sizes shrunk to a tiny model on 2 processes (CP 2).
# Make the tokenizer and data first: python examples/make_tiny_assets.py data/tiny
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, DATA_DIR,
# CKPT_LOAD_DIR, CKPT_SAVE_DIR, LOG_DIR.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTORCH_NPU_ALLOC_CONF=expandable_segments:True

NPUS_PER_NODE=${NPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-10}
DATA_DIR=${DATA_DIR:-./data/tiny}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./ckpt/mixtral_tiny}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/mixtral_tiny}
LOG_DIR=${LOG_DIR:-./logs}
DATA_PATH="$DATA_DIR/llama2_text_document"
TOKENIZER_MODEL="$DATA_DIR/spm.model"
TP=1
PP=1
EP=1
CP=2
CP_TYPE='megatron_cp_algo'
NUM_LAYERS=2

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

MOE_ARGS="
    --num-experts 4 \
    --expert-model-parallel-size ${EP} \
    --moe-router-topk 2 \
    --moe-router-load-balancing-type aux_loss \
    --moe-aux-loss-coeff 0.02 \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-grouped-gemm \
    --moe-layer-freq -1 \
    --moe-permute-fusion \
    --first-k-dense-replace -1 \
    --use-cp-send-recv-overlap
"

GPT_ARGS="
    --use-mcore-models \
    --disable-bias-linear \
    --seq-length 256 \
    --max-position-embeddings 256 \
    --num-layers ${NUM_LAYERS} \
    --hidden-size 64 \
    --ffn-hidden-size 112 \
    --num-attention-heads 4 \
    --init-method-std 0.01 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --normalization RMSNorm \
    --position-embedding-type rope \
    --swiglu \
    --untie-embeddings-and-output-weights \
    --group-query-attention \
    --num-query-groups 2 \
    --vocab-size 512 \
    --rotary-base 1000000 \
    --no-masked-softmax-fusion \
    --use-fused-rotary-pos-emb \
    --use-flash-attn \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --no-check-for-nan-in-loss-and-grad \
    --overlap-grad-reduce \
    --overlap-param-gather \
    --make-vocab-size-divisible-by 1 \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --sequence-parallel \
    --use-distributed-optimizer \
    --context-parallel-size ${CP} \
    --context-parallel-algo ${CP_TYPE} \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --load ${CKPT_LOAD_DIR} \
    --save ${CKPT_SAVE_DIR} \
    --micro-batch-size 1 \
    --global-batch-size 4 \
    --lr 1e-3 \
    --train-iters ${TRAIN_ITERS} \
    --lr-decay-iters 8 \
    --lr-decay-style cosine \
    --min-lr 1.0e-4 \
    --weight-decay 0.1 \
    --lr-warmup-iters 2 \
    --clip-grad 1.0 \
    --bf16 \
    --no-load-optim \
    --no-load-rng \
    --no-shared-storage
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 99990,8,2
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval 5001 \
    --eval-iters 100
"

mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS -m mm_train \
    $MOE_ARGS \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    | tee "$LOG_DIR/train_mixtral_tiny.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/train_mixtral_tiny.log"
