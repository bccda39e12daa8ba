#!/usr/bin/env bash
# Reward model (--stage rm), full fine-tuning of Llama-2-7b-chat-hf: a scalar value head in place of the
# output layer, trained on the same pairwise data as DPO. TP4 x PP1 x DP2 on one node of 8 x 80 GB GPUs.
# Before:
#   bash examples/mcore/llama2/data_convert_llama2_7b_pairwise.sh   (tokenized pairs in $DATA_PATH)
#   bash examples/mcore/llama2/ckpt_convert_llama2_7b_hf2mcore.sh   (TP4 PP1 checkpoint)
# After: bash examples/mcore/llama2/ckpt_convert_llama2_7b_mcore2hf.sh
#   with MCORE_CKPT_DIR=$CKPT_SAVE_DIR HF_SAVE_DIR=./rm-hf writes a transformers
#   *ForSequenceClassification (num_labels 1); tools/score.py scores answers with it.
# Layout and memory: docs/parallelism.md. Hyperparameters are a starting point, not a tuned recipe.
# A failure: torchrun exits 1 and prints ChildFailedError, whose "Root Cause" names the first failing rank,
# its host and exit code; that rank's message is in $LOG_DIR/<run>/attempt_0/<local rank>/stderr.log there.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
CKPT_LOAD_DIR="${CKPT_LOAD_DIR:-./model_weights/llama2-7b-mcore-tp4pp1}"
CKPT_SAVE_DIR="${CKPT_SAVE_DIR:-./ckpt/llama2-7b-rm-full}"
DATA_PATH="${DATA_PATH:-./dataset/llama2-7b/ultrafeedback}"
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
MBS=1    # pairs per micro-batch (each pair is a chosen and a rejected sequence)
GBS=64   # pairs per optimizer step
TRAIN_ITERS="${TRAIN_ITERS:-1000}"   # about pairs x epochs / GBS

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
    --log-dir "$LOG_DIR" --redirects 3 --tee 3   # per-rank log files, and the console as before
)

# Llama-2-7b-chat-hf: the model flags tools/checkpoint/convert_ckpt.py prints for its config.json.
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008
    --num-attention-heads 32 --kv-channels 128
    --max-position-embeddings 4096 --rotary-base 10000
    --normalization RMSNorm --norm-epsilon 1e-05 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 32000
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
    --use-distributed-optimizer --bf16
)

RM_ARGS=(
    --stage rm --center-rewards-coefficient 0.01   # TRL's RewardConfig name; 0 turns it off
)

TRAINING_ARGS=(
    --seq-length "$SEQ_LEN" --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
    --lr 5e-6 --min-lr 0.0 --lr-decay-style cosine --lr-warmup-fraction 0.1
    --weight-decay 0.0 --clip-grad 1.0 --seed 1234
)

DATA_ARGS=(
    --data-path "$DATA_PATH" --is-pairwise-dataset --split 98,2,0
)

OUTPUT_ARGS=(
    --load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" --save-interval 200
    --log-interval 1 --eval-interval 100 --eval-iters 10 --tensorboard-dir "$TENSORBOARD_DIR"
)

run torchrun "${DISTRIBUTED_ARGS[@]}" "$ENGINE_ROOT/pretrain_dpo.py" \
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${RM_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}"
