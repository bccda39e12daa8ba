#!/usr/bin/env bash
# Tokenize preference pairs for dpo_qwen3_30b_a3b_*_ptd.sh with the qwen3 prompt type and the Qwen3-30B-A3B tokenizer.
# Default input: HuggingFaceH4/ultrafeedback_binarized (train_prefs split, parquet): each row's "chosen" and
# "rejected" are whole conversations sharing the prompt, so TrlStylePairwiseHandler reads them with
# --map-keys '{"prompt":""}' (ignore the plain-text "prompt" column; the prompt is the shared prefix).
# For Alpaca-style JSONL (instruction/input/chosen/rejected) use --handler-name AlpacaStylePairwiseHandler
# and drop --map-keys; formats: README.md "Data formats".
# Writes ${OUTPUT_PREFIX}_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}.
# Re-running replaces that data set (--overwrite); its old files stay until the new ones are complete.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# ---- paths: edit these ----
INPUT="${INPUT:-./dataset/ultrafeedback_binarized/data/train_prefs-00000-of-00001.parquet}"
TOKENIZER_DIR="${TOKENIZER_DIR:-./model_from_hf/Qwen3-30B-A3B}"
OUTPUT_PREFIX="${OUTPUT_PREFIX:-./dataset/qwen3-30b-a3b/ultrafeedback}"
SEQ_LEN=4096    # the --seq-length of the training script: longer pairs are truncated
WORKERS="${WORKERS:-16}"

source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

run mkdir -p "$(dirname "$OUTPUT_PREFIX")"
run "$PYTHON" "$ENGINE_ROOT/preprocess_data.py" \
    --input "$INPUT" --output-prefix "$OUTPUT_PREFIX" \
    --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_DIR" \
    --handler-name TrlStylePairwiseHandler --map-keys '{"prompt":""}' \
    --prompt-type qwen3 --seq-length "$SEQ_LEN" --workers "$WORKERS" --log-interval 1000 --overwrite
