#!/usr/bin/env bash
# Convert Mixtral-8x7B-Instruct-v0.1 from Hugging Face to a megatron-core checkpoint for dpo_mixtral_8x7b_*_ptd.sh.
# The TP/PP written here must be the ones the training script runs with (default TP2 PP1 EP8).
# The converter prints the pretrain_dpo.py model flags; they equal MODEL_ARGS in dpo_mixtral_8x7b_full_ptd.sh.
# Runs on CPU (no GPU); it holds about one pipeline stage of rank files in memory (benchmarks/RESULTS.md).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths and layout: edit these ----
HF_MODEL_DIR="${HF_MODEL_DIR:-./model_from_hf/Mixtral-8x7B-Instruct-v0.1}"
TP="${TP:-2}"
PP="${PP:-1}"
EP="${EP:-8}"   # expert parallel: each EP rank's files hold its experts (mp_rank_TT[_PPP]_EEE)
MCORE_CKPT_DIR="${MCORE_CKPT_DIR:-./model_weights/mixtral-8x7b-mcore-tp${TP}pp${PP}ep${EP}}"

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

run "$PYTHON" "$ENGINE_ROOT/tools/checkpoint/convert_ckpt.py" \
    --model-type GPT --load-model-type hf --save-model-type mg --model-type-hf mixtral \
    --load-dir "$HF_MODEL_DIR" --save-dir "$MCORE_CKPT_DIR" --tokenizer-model "$HF_MODEL_DIR" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP" \
    --target-expert-parallel-size "$EP"
