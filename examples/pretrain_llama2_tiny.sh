#!/bin/bash
# Dense pre-training in the shape of MindSpeed-LLM's Llama2-7B launch script (pipeline parallel,
# distributed optimizer, SentencePiece Llama2 tokenizer, --split with evaluation), every flag as the
# real script has it, sizes shrunk to a tiny model on 2 processes. Make the tokenizer and data first:
#   python examples/make_tiny_assets.py data/tiny
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
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))
TRAIN_ITERS=${TRAIN_ITERS:-10}
DATA_DIR=${DATA_DIR:-./data/tiny}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./ckpt/llama2_tiny}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/llama2_tiny}
LOG_DIR=${LOG_DIR:-./logs}
DATA_PATH="$DATA_DIR/llama2_text_document"
TOKENIZER_MODEL="$DATA_DIR/spm.model"
TP=1
PP=2

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
    --num-layers 4 \
    --hidden-size 64 \
    --ffn-hidden-size 176 \
    --num-attention-heads 4 \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --seq-length 128 \
    --max-position-embeddings 128 \
    --micro-batch-size 1 \
    --global-batch-size 8 \
    --make-vocab-size-divisible-by 1 \
    --lr 1.25e-3 \
    --train-iters ${TRAIN_ITERS} \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-flash-attn \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1.25e-4 \
    --weight-decay 1e-1 \
    --lr-warmup-fraction 0.01 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --initial-loss-scale 65536 \
    --adam-beta2 0.95 \
    --no-gradient-accumulation-fusion \
    --no-load-optim \
    --no-load-rng \
    --use-distributed-optimizer \
    --use-fused-swiglu \
    --use-fused-rotary-pos-emb \
    --overlap-grad-reduce \
    --bf16
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 949,50,1
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval 5 \
    --eval-iters 2
"

mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    --load $CKPT_LOAD_DIR \
    --save $CKPT_SAVE_DIR \
    | tee "$LOG_DIR/train_llama2_tiny.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/train_llama2_tiny.log"
