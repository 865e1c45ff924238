#!/bin/bash
# Long-sequence pre-training in the shape of MindSpeed-LLM's Llama2-70B 128k launch script: ring
# context parallel (megatron_cp_algo with the send/receive overlap), pipeline parallel with the
# interleaved schedule (--num-layers-per-virtual-pipeline-stage), distributed optimizer with overlapped
# gradient reduction and parameter gathering, and Ascend memory options (accepted, no effect here).
# Every flag as the real script has it, sizes shrunk to a tiny model on 4 processes
# (PP 2 x CP 2). Make the tokenizer and data first: python examples/make_tiny_assets.py data/tiny
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, DATA_DIR,
# CKPT_LOAD_DIR, CKPT_SAVE_DIR, LOG_DIR.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-4}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-10}
DATA_DIR=${DATA_DIR:-./data/tiny}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./ckpt/llama2_tiny_128k}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/llama2_tiny_128k}
LOG_DIR=${LOG_DIR:-./logs}
DATA_PATH="$DATA_DIR/llama2_text_document"
TOKENIZER_MODEL="$DATA_DIR/spm.model"
TP=1
PP=2
CP=2
VPP_STAGE=1

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

ACCELERATE_ARGS="
    --swap-attention \
    --reuse-fp32-param \
    --enable-recompute-layers-per-pp-rank \
    --recompute-activation-function \
    --recompute-num-layers 1
"

GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --num-layers-per-virtual-pipeline-stage ${VPP_STAGE} \
    --context-parallel-size ${CP} \
    --context-parallel-algo megatron_cp_algo \
    --use-fused-rotary-pos-emb \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --use-cp-send-recv-overlap \
    --log-throughput \
    --overlap-grad-reduce \
    --overlap-param-gather \
    --sequence-parallel \
    --use-distributed-optimizer \
    --num-layers 4 \
    --hidden-size 64 \
    --ffn-hidden-size 176 \
    --num-attention-heads 8 \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --seq-length 512 \
    --max-position-embeddings 512 \
    --micro-batch-size 1 \
    --global-batch-size 4 \
    --make-vocab-size-divisible-by 1 \
    --lr 1.0e-3 \
    --train-iters ${TRAIN_ITERS} \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --attention-dropout 0.0 \
    --init-method-std 0.01 \
    --hidden-dropout 0.0 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --swiglu \
    --use-flash-attn \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1.0e-4 \
    --weight-decay 0.1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --initial-loss-scale 4096.0 \
    --adam-beta2 0.95 \
    --adam-eps 1e-5 \
    --no-gradient-accumulation-fusion \
    --disable-bias-linear \
    --group-query-attention \
    --num-query-groups 2 \
    --lr-warmup-fraction 0.01 \
    --bf16
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 949,50,1
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 1 \
    --save $CKPT_SAVE_DIR \
    --load $CKPT_LOAD_DIR
"

mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $ACCELERATE_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    | tee "$LOG_DIR/train_llama2_tiny_128k.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/train_llama2_tiny_128k.log"
