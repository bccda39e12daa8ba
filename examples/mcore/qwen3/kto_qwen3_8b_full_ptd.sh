#!/usr/bin/env bash
# KTO (unpaired data), full fine-tuning of Qwen3-8B: TP4 x PP1 x DP2 on one node of 8 x 80 GB GPUs.
# Before:
#   bash examples/mcore/qwen3/data_convert_qwen3_8b_unpaired.sh   (unpaired samples in $DATA_PATH)
#   bash examples/mcore/qwen3/ckpt_convert_qwen3_8b_hf2mcore.sh   (TP4 PP1 checkpoint)
# After: bash examples/mcore/qwen3/ckpt_convert_qwen3_8b_mcore2hf.sh turns $CKPT_SAVE_DIR into an HF folder.
# Layout and memory: docs/parallelism.md. Hyperparameters are a starting point, not a tuned recipe.
# A failure: torchrun exits 1 and prints ChildFailedError, whose "Root Cause" names the first failing rank,
# its host and exit code; that rank's message is in $LOG_DIR/<run>/attempt_0/<local rank>/stderr.log there.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
CKPT_LOAD_DIR="${CKPT_LOAD_DIR:-./model_weights/qwen3-8b-mcore-tp4pp1}"
CKPT_SAVE_DIR="${CKPT_SAVE_DIR:-./ckpt/qwen3-8b-kto-full}"
DATA_PATH="${DATA_PATH:-./dataset/qwen3-8b/ultrafeedback-unpaired}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CKPT_SAVE_DIR/tensorboard}"
LOG_DIR="${LOG_DIR:-$CKPT_SAVE_DIR/logs}"   # each rank's stdout.log and stderr.log (torchrun --log-dir)

# ---- cluster: set on every node (same MASTER_ADDR/MASTER_PORT/NNODES, its own NODE_RANK) ----
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"

# ---- layout and batch (TP/PP must match the converted checkpoint) ----
TP=4
PP=1
SEQ_LEN=4096
MBS=2    # samples per micro-batch (>= 2: each prompt's KL completion is another sample's of its micro-batch)
GBS=128  # samples per optimizer step (the KL point is their mean)
TRAIN_ITERS="${TRAIN_ITERS:-1000}"   # about samples x epochs / GBS

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    --log-dir "$LOG_DIR" --redirects 3 --tee 3   # per-rank log files, and the console as before
)

# Qwen3-8B: the model flags tools/checkpoint/convert_ckpt.py prints for its config.json.
# The qwen3 prompt type writes an empty <think></think> block before each answer (non-thinking mode).
MODEL_ARGS=(
    --num-layers 36 --hidden-size 4096 --ffn-hidden-size 12288
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --max-position-embeddings 40960 --rotary-base 1000000 --qk-layernorm
    --normalization RMSNorm --norm-epsilon 1e-06 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 151936
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
    --use-distributed-optimizer --bf16
)

KTO_ARGS=(   # TRL's KTOTrainer defaults; weight the rarer kind up when thumbs-up and -down are unbalanced
    --stage kto --dpo-beta 0.1 --kto-desirable-weight 1.0 --kto-undesirable-weight 1.0
)

TRAINING_ARGS=(
    --seq-length "$SEQ_LEN" --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
    --lr 5e-7 --min-lr 0.0 --lr-decay-style cosine --lr-warmup-fraction 0.1
    --weight-decay 0.0 --clip-grad 1.0 --seed 1234
)

DATA_ARGS=(
    --data-path "$DATA_PATH" --split 98,2,0
)

OUTPUT_ARGS=(
    --load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" --save-interval 200
    --log-interval 1 --eval-interval 100 --eval-iters 10 --tensorboard-dir "$TENSORBOARD_DIR"
)

run torchrun "${DISTRIBUTED_ARGS[@]}" "$ENGINE_ROOT/pretrain_dpo.py" \
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${KTO_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}"
