#!/usr/bin/env bash
# DPO, LoRA fine-tuning of Llama-3.1-70B-Instruct: TP8 x PP1 x DP1 on one node of 8 x 80 GB GPUs.
# Before:
#   bash examples/mcore/llama3/data_convert_llama3_70b_pairwise.sh   (tokenized pairs in $DATA_PATH)
#   TP=8 PP=1 bash examples/mcore/llama3/ckpt_convert_llama3_70b_hf2mcore.sh  (this layout differs from the full run's)
# LoRA flags as the LoRA work defines them: rank 16, alpha 32 on every linear layer of each block;
# --lora-ckpt-filter saves only the adapter weights; add --lora-load DIR to resume from saved adapters.
# Layout and memory: docs/parallelism.md. Hyperparameters are a starting point, not a tuned recipe.
# A failure: torchrun exits 1 and prints ChildFailedError, whose "Root Cause" names the first failing rank,
# its host and exit code; that rank's message is in $LOG_DIR/<run>/attempt_0/<local rank>/stderr.log there.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
CKPT_LOAD_DIR="${CKPT_LOAD_DIR:-./model_weights/llama3-70b-mcore-tp8pp1}"
CKPT_SAVE_DIR="${CKPT_SAVE_DIR:-./ckpt/llama3-70b-dpo-lora}"
DATA_PATH="${DATA_PATH:-./dataset/llama3-70b/ultrafeedback}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$CKPT_SAVE_DIR/tensorboard}"
LOG_DIR="${LOG_DIR:-$CKPT_SAVE_DIR/logs}"   # each rank's stdout.log and stderr.log (torchrun --log-dir)

# ---- cluster: set on every node (same MASTER_ADDR/MASTER_PORT/NNODES, its own NODE_RANK) ----
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"

# ---- layout and batch (TP/PP must match the converted checkpoint) ----
TP=8
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

# Llama-3.1-70B-Instruct: the model flags tools/checkpoint/convert_ckpt.py prints for its config.json.
# Llama-3-70B (not 3.1): drop the five rope-scaling flags and use --max-position-embeddings 8192.
MODEL_ARGS=(
    --num-layers 80 --hidden-size 8192 --ffn-hidden-size 28672
    --num-attention-heads 64 --group-query-attention --num-query-groups 8 --kv-channels 128
    --max-position-embeddings 131072 --rotary-base 500000
    --rope-scaling-type llama3 --rope-scaling-factor 8.0 --low-freq-factor 1.0 --high-freq-factor 4.0
    --original-max-position-embeddings 8192
    --normalization RMSNorm --norm-epsilon 1e-05 --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights --vocab-size 128256
)

PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
    --use-distributed-optimizer --bf16
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
    "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DPO_ARGS[@]}" "${LORA_ARGS[@]}" "${TRAINING_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${OUTPUT_ARGS[@]}"
