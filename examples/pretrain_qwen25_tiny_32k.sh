#!/bin/bash
# Dense pre-training of a long sequence in the shape of MindSpeed-LLM's Qwen2.5-7B 32k launch script
# (tensor parallel with sequence parallel, grouped-query attention, a Hugging Face tokenizer directory,
# --padded-vocab-size, --log-throughput), every flag as the real script has it, sizes shrunk to a tiny
# model on 2 processes. Make the tokenizer and data first: python examples/make_tiny_assets.py data/tiny
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, DATA_DIR,
# CKPT_LOAD_DIR, CKPT_SAVE_DIR, LOG_DIR.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-10}
DATA_DIR=${DATA_DIR:-./data/tiny}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./ckpt/qwen25_tiny}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/qwen25_tiny}
LOG_DIR=${LOG_DIR:-./logs}
DATA_PATH="$DATA_DIR/hf_text_document"
TOKENIZER_PATH="$DATA_DIR/hf_tokenizer"
TP=2
PP=1
SEQ_LEN=256
MBS=1
GBS=4

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
    --sequence-parallel \
    --num-layers 2 \
    --hidden-size 64 \
    --ffn-hidden-size 192 \
    --num-attention-heads 4 \
    --max-position-embeddings ${SEQ_LEN} \
    --seq-length ${SEQ_LEN} \
    --disable-bias-linear \
    --add-qkv-bias \
    --group-query-attention \
    --num-query-groups 2 \
    --use-flash-attn \
    --swiglu \
    --use-fused-swiglu \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --use-fused-rmsnorm \
    --position-embedding-type rope \
    --rotary-base 1000000 \
    --use-fused-rotary-pos-emb \
    --untie-embeddings-and-output-weights \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --make-vocab-size-divisible-by 1 \
    --padded-vocab-size 512 \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --train-iters ${TRAIN_ITERS} \
    --lr 1.25e-3 \
    --lr-decay-style cosine \
    --min-lr 1.25e-4 \
    --lr-warmup-fraction 0.01 \
    --init-method-std 0.01 \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 4096 \
    --no-gradient-accumulation-fusion \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --bf16
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 100,0,0
"

CKPT_ARGS="
    --load ${CKPT_LOAD_DIR} \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --seed 1234 \
    --save ${CKPT_SAVE_DIR}
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 0 \
    --log-throughput
"

mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $DATA_ARGS \
    $CKPT_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    | tee "$LOG_DIR/pretrain_qwen25_tiny_32k.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/pretrain_qwen25_tiny_32k.log" ${GBS}
