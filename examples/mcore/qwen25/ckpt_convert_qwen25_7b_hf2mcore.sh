#!/usr/bin/env bash
# Convert Qwen2.5-7B-Instruct from Hugging Face to a megatron-core checkpoint for dpo_qwen25_7b_*_ptd.sh.
# The TP/PP written here must be the ones the training script runs with (default TP4 PP1).
# The converter prints the pretrain_dpo.py model flags; they equal MODEL_ARGS in dpo_qwen25_7b_full_ptd.sh.
# Runs on CPU (no GPU); it holds about one pipeline stage of rank files in memory (benchmarks/RESULTS.md).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths and layout: edit these ----
HF_MODEL_DIR="${HF_MODEL_DIR:-./model_from_hf/Qwen2.5-7B-Instruct}"
TP="${TP:-4}"
PP="${PP:-1}"
MCORE_CKPT_DIR="${MCORE_CKPT_DIR:-./model_weights/qwen25-7b-mcore-tp${TP}pp${PP}}"

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

run "$PYTHON" "$ENGINE_ROOT/tools/checkpoint/convert_ckpt.py" \
    --model-type GPT --load-model-type hf --save-model-type mg --model-type-hf qwen2 \
    --load-dir "$HF_MODEL_DIR" --save-dir "$MCORE_CKPT_DIR" --tokenizer-model "$HF_MODEL_DIR" \
    --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP" \
    --add-qkv-bias
