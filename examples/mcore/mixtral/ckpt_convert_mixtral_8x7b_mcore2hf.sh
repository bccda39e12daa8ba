#!/usr/bin/env bash
# Convert the policy trained by dpo_mixtral_8x7b_full_ptd.sh back to a Hugging Face folder
# (config.json, safetensors shards, the tokenizer recorded at hf2mcore time) that loads in transformers.
# Any TP/PP/EP layout is read (experts are written one tensor per projection, as transformers saves them); --load-iteration N picks an iteration other than the latest.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
MCORE_CKPT_DIR="${MCORE_CKPT_DIR:-./ckpt/mixtral-8x7b-dpo-full}"   # --save of dpo_mixtral_8x7b_full_ptd.sh
HF_SAVE_DIR="${HF_SAVE_DIR:-./model_from_hf/Mixtral-8x7B-Instruct-v0.1-dpo}"

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

run "$PYTHON" "$ENGINE_ROOT/tools/checkpoint/convert_ckpt.py" \
    --model-type GPT --load-model-type mg --save-model-type hf \
    --load-dir "$MCORE_CKPT_DIR" --save-dir "$HF_SAVE_DIR" --max-shard-size 5GB
