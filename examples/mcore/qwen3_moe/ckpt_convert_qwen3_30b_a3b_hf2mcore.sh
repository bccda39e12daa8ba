#!/usr/bin/env bash
# Convert Qwen3-30B-A3B from Hugging Face to a megatron-core checkpoint for dpo_qwen3_30b_a3b_*_ptd.sh.
# The TP/PP written here must be the ones the training script runs with (default TP1 PP2 EP8).
# The converter prints the pretrain_dpo.py model flags; they equal MODEL_ARGS in dpo_qwen3_30b_a3b_full_ptd.sh.
# Runs on CPU (no GPU); it holds about one pipeline stage of rank files in memory (benchmarks/RESULTS.md).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths and layout: edit these ----
HF_MODEL_DIR="${HF_MODEL_DIR:-./model_from_hf/Qwen3-30B-A3B}"
TP="${TP:-1}"
PP="${PP:-2}"
EP="${EP:-8}"   # expert parallel: each EP rank's files hold its experts (mp_rank_TT[_PPP]_EEE)
MCORE_CKPT_DIR="${MCORE_CKPT_DIR:-./model_weights/qwen3-30b-a3b-mcore-tp${TP}pp${PP}ep${EP}}"

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

run "$PYTHON" "$ENGINE_ROOT/tools/checkpoint/convert_ckpt.py" \
    --model-type GPT --load-model-type hf --save-model-type mg --model-type-hf qwen3_moe \
    --load-dir "$HF_MODEL_DIR" --save-dir "$MCORE_CKPT_DIR" --tokenizer-model "$HF_MODEL_DIR" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP" \
    --target-expert-parallel-size "$EP"
