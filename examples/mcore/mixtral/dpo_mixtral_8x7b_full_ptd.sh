#!/usr/bin/env bash
# DPO, full fine-tuning of Mixtral-8x7B-Instruct-v0.1 on two nodes of 8 x 80 GB GPUs: TP2 (with sequence
# parallel) x EP8, one expert per GPU per layer.
# Before:
#   bash examples/mcore/mixtral/data_convert_mixtral_8x7b_pairwise.sh   (tokenized pairs in $DATA_PATH)
#   bash examples/mcore/mixtral/ckpt_convert_mixtral_8x7b_hf2mcore.sh   (TP2 PP1 EP8 checkpoint)
# After: bash examples/mcore/mixtral/ckpt_convert_mixtral_8x7b_mcore2hf.sh turns $CKPT_SAVE_DIR into an HF folder.
# Layout and memory: docs/parallelism.md. Hyperparameters are a starting point, not a tuned recipe.
# A failure: torchrun exits 1 and prints ChildFailedError, whose "Root Cause" names the first failing rank,
# its host and exit code; that rank's message is in $LOG_DIR/<run>/attempt_0/<local rank>/stderr.log there.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
CKPT_LOAD_DIR="${CKPT_LOAD_DIR:-./model_weights/mixtral-8x7b-mcore-tp2pp1ep8}"
CKPT_SAVE_DIR="${CKPT_SAVE_DIR:-./ckpt/mixtral-8x7b-dpo-full}"
DATA_PATH="${DATA_PATH:-./dataset/mixtral-8x7b/ultrafeedback}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CKPT_SAVE_DIR/tensorboard}"
LOG_DIR="${LOG_DIR:-$CKPT_SAVE_DIR/logs}"   # each rank's stdout.log and stderr.log (torchrun --log-dir)

# ---- cluster: set on every node (same MASTER_ADDR/MASTER_PORT/NNODES, its own NODE_RANK) ----
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"

# ---- layout and batch (TP/PP/EP must match the converted checkpoint) ----
TP=2
PP=1
EP=8   # each GPU holds (experts per layer) / EP experts of every layer; expert TP = TP
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

# Mixtral-8x7B-Instruct-v0.1: the model flags tools/checkpoint/convert_ckpt.py prints for its config.json.
MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
    --num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
    --max-position-embeddings 32768 --rotary-base 1000000
    --normalization RMSNorm --norm-epsilon 1e-05 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 32000
    --num-experts 8 --moe-ffn-hidden-size 14336 --moe-router-topk 2
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
    --expert-model-parallel-size "$EP"
    --use-distributed-optimizer --bf16
)

# Router losses join the policy's loss only (logged as moe/load_balancing_loss, moe/z_loss).
MOE_ARGS=(
    --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.001
)

DPO_ARGS=(
    --stage dpo --dpo-loss-type sigmoid --dpo-beta 0.1 --dpo-label-smoothing 0.0 --pref-ftx 0.0
)

TRAINING_ARGS=(
    --seq-length "$SEQ_LEN" --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
    --lr 5e-7 --min-lr 0.0 --lr-decay-style cosine --lr-warmup-fraction 0.1
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
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DPO_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}"
