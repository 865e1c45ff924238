#!/bin/bash
# DeepSeek-style MoE pre-training in the shape of MindSpeed-LLM's DeepSeek-V2-Lite launch script
# (python -m torch.distributed.launch, expert parallel, shared experts, the first layer dense, fine-grained
# experts with group-limited routing and a sequence-level balance loss, full recompute), every flag as the
# real script has it except two blocks mm-train does not build, sizes shrunk to a tiny model on 2 processes.
# Not built, so left out (mm-train refuses them by name in one line):
#   MLA_ARGS  --spec mindspeed_llm.tasks.models.spec.deepseek_spec --multi-latent-attention
#             --qk-pos-emb-head-dim 64 --qk-head-dim 128 --kv-lora-rank 512 --v-head-dim 128 --qk-layernorm
#   ROPE_ARGS --rope-scaling-type yarn --rope-scaling-factor 40 ... (YaRN)
#   and --moe-router-load-balancing-type pai_megatron_aux_loss (megatron-core's aux_loss here)
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
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-./ckpt/deepseek_style_tiny}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-./ckpt/deepseek_style_tiny}
LOG_DIR=${LOG_DIR:-./logs}
DATA_PATH="$DATA_DIR/hf_text_document"
TOKENIZER_MODEL="$DATA_DIR/hf_tokenizer"
TP=1
PP=1
EP=2

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

MOE_ARGS="
    --moe-grouped-gemm \
    --moe-alltoall-overlap-comm \
    --moe-permutation-async-comm \
    --moe-token-dispatcher-type alltoall_seq \
    --moe-permute-fusion \
    --first-k-dense-replace 1 \
    --moe-layer-freq 1 \
    --n-shared-experts 2 \
    --num-experts 8 \
    --moe-router-topk 2 \
    --moe-ffn-hidden-size 32 \
    --moe-router-load-balancing-type aux_loss \
    --moe-router-group-topk 2 \
    --moe-router-num-groups 4 \
    --moe-aux-loss-coeff 0.01 \
    --moe-router-topk-scaling-factor 1.0 \
    --seq-aux
"

GPT_ARGS="
    --shape-order BNSD \
    --reuse-fp32-param \
    --load $CKPT_LOAD_DIR \
    --use-distributed-optimizer \
    --use-flash-attn \
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --sequence-parallel \
    --num-layers 3 \
    --recompute-granularity full \
    --recompute-method uniform \
    --recompute-num-layers 1 \
    --hidden-size 64 \
    --ffn-hidden-size 176 \
    --num-attention-heads 4 \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_MODEL} \
    --finetune \
    --num-workers 2 \
    --seq-length 128 \
    --max-position-embeddings 1024 \
    --micro-batch-size 1 \
    --global-batch-size 4 \
    --make-vocab-size-divisible-by 1 \
    --lr 2e-3 \
    --train-iters ${TRAIN_ITERS} \
    --lr-decay-iters ${TRAIN_ITERS} \
    --lr-decay-style cosine \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --init-method-std 0.02 \
    --hidden-dropout 0.0 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --use-fused-rotary-pos-emb \
    --use-rotary-position-embeddings \
    --use-fused-swiglu \
    --use-fused-rmsnorm \
    --swiglu \
    --no-masked-softmax-fusion \
    --attention-softmax-in-fp32 \
    --min-lr 1.0e-5 \
    --weight-decay 1e-1 \
    --lr-warmup-iters 1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --initial-loss-scale 65536 \
    --vocab-size 512 \
    --padded-vocab-size 512 \
    --rotary-base 10000 \
    --no-gradient-accumulation-fusion \
    --norm-epsilon 1e-6 \
    --no-load-optim \
    --no-load-rng \
    --bf16
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 99,1,0
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${TRAIN_ITERS} \
    --eval-interval ${TRAIN_ITERS} \
    --eval-iters 1 \
    --no-save-optim \
    --no-save-rng
"

mkdir -p "$LOG_DIR"
python -m torch.distributed.launch $DISTRIBUTED_ARGS -m mm_train \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    $MOE_ARGS \
    --distributed-backend nccl \
    --save $CKPT_SAVE_DIR \
    | tee "$LOG_DIR/pretrain_deepseek_style_tiny.log"

bash "$(dirname "$0")/report_throughput.sh" "$LOG_DIR/pretrain_deepseek_style_tiny.log"
