#!/bin/bash
# Fine-tuning in the shape of MindSpeed-MM's Qwen2.5-VL-7B launch script, for the part that applies to a
# GPT: pipeline parallel, token ids as stored (NullTokenizer), variable sequence lengths, distributed
# optimizer, --log-tps, and MindSpeed-MM's throughput report at the end. Every flag as the real script has
# it, sizes shrunk to a tiny model on 2 processes; the multimodal arguments (--mm-data, --mm-model,
# --mm-tool) give the model sizes there, here --num-layers ... do, training a GPT (finetune_tiny_qwen25vl.sh
# trains the vision-language model itself).
# Make the data first: python examples/make_tiny_assets.py data/tiny
# Overridable: NPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK, TRAIN_ITERS, DATA_DIR,
# LOAD_PATH, SAVE_PATH, LOG_DIR.
set -euo pipefail
export ASCEND_SLOG_PRINT_TO_STDOUT=0
export ASCEND_GLOBAL_LOG_LEVEL=3
export TASK_QUEUE_ENABLE=2
export COMBINED_ENABLE=1
export CPU_AFFINITY_CONF=1
export HCCL_CONNECT_TIMEOUT=1200
export NPU_ASD_ENABLE=0
export ASCEND_LAUNCH_BLOCKING=0
export ACLNN_CACHE_LIMIT=100000
export CUDA_DEVICE_MAX_CONNECTIONS=1

NPUS_PER_NODE=${NPUS_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$(($NPUS_PER_NODE*$NNODES))
TRAIN_ITERS=${TRAIN_ITERS:-10}
DATA_DIR=${DATA_DIR:-./data/tiny}
LOAD_PATH=${LOAD_PATH:-ckpt/mm_path/tiny-instruct}
SAVE_PATH=${SAVE_PATH:-save_dir}
LOG_DIR=${LOG_DIR:-./logs}
logfile=$(date +%Y%m%d)_$(date +%H%M%S)

TP=1
PP=2
CP=1
MBS=1
GRAD_ACC_STEP=4
DP=$(($WORLD_SIZE/$TP/$PP/$CP))
GBS=$(($MBS*$GRAD_ACC_STEP*$DP))

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
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size 256 \
    --seq-length 256 \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --no-masked-softmax-fusion \
    --lr 1.0e-3 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters ${TRAIN_ITERS} \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --load ${LOAD_PATH} \
    --use-flash-attn \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers 2 \
    --distributed-timeout-minutes 20
"

MODEL_ARGS="
    --num-layers 4 \
    --hidden-size 64 \
    --num-attention-heads 4 \
    --position-embedding-type rope \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --data-path $DATA_DIR/ids_text_document
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 10000 \
    --eval-iters 5000 \
    --save ${SAVE_PATH} \
    --ckpt-format torch \
    --log-tps
"

mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $MODEL_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee "$LOG_DIR/train_${logfile}.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/train_${logfile}.log" ${GBS}
