#!/usr/bin/env bash
# DPO, LoRA fine-tuning of Qwen3-30B-A3B on one node of 8 x 80 GB GPUs: EP8 (16 experts per GPU per layer);
# frozen base, adapters on every expert.
# Before:
#   bash examples/mcore/qwen3_moe/data_convert_qwen3_30b_a3b_pairwise.sh   (tokenized pairs in $DATA_PATH)
#   bash examples/mcore/qwen3_moe/ckpt_convert_qwen3_30b_a3b_hf2mcore.sh   (TP1 PP1 EP8 checkpoint)
# LoRA flags as the LoRA work defines them: rank 16, alpha 32 on attention and on every expert's linears (each expert its own adapters);
# --lora-ckpt-filter saves only the adapter weights; add --lora-load DIR to resume from saved adapters.
# Layout and memory: docs/parallelism.md. Hyperparameters are a starting point, not a tuned recipe.
# A failure: torchrun exits 1 and prints ChildFailedError, whose "Root Cause" names the first failing rank,
# its host and exit code; that rank's message is in $LOG_DIR/<run>/attempt_0/<local rank>/stderr.log there.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
CKPT_LOAD_DIR="${CKPT_LOAD_DIR:-./model_weights/qwen3-30b-a3b-mcore-tp1pp1ep8}"
CKPT_SAVE_DIR="${CKPT_SAVE_DIR:-./ckpt/qwen3-30b-a3b-dpo-lora}"
DATA_PATH="${DATA_PATH:-./dataset/qwen3-30b-a3b/ultrafeedback}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CKPT_SAVE_DIR/tensorboard}"
LOG_DIR="${LOG_DIR:-$CKPT_SAVE_DIR/logs}"   # each rank's stdout.log and stderr.log (torchrun --log-dir)

# ---- cluster: set on every node (same MASTER_ADDR/MASTER_PORT/NNODES, its own NODE_RANK) ----
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"

# ---- layout and batch (TP/PP/EP must match the converted checkpoint) ----
TP=1
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

# Qwen3-30B-A3B: the model flags tools/checkpoint/convert_ckpt.py prints for its config.json.
# The qwen3 prompt type writes an empty <think></think> block before each answer (non-thinking mode).
MODEL_ARGS=(
    --num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144
    --num-attention-heads 32 --group-query-attention --num-query-groups 4 --kv-channels 128
    --max-position-embeddings 40960 --rotary-base 1000000 --qk-layernorm
    --normalization RMSNorm --norm-epsilon 1e-06 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 151936
    --num-experts 128 --moe-ffn-hidden-size 768 --moe-router-topk 8
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
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

LORA_ARGS=(
    --lora-r 16 --lora-alpha 32
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
    --lora-ckpt-filter
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
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${MOE_ARGS[@]}" "${DPO_ARGS[@]}" "${LORA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}"
