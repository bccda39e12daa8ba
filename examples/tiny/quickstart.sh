#!/usr/bin/env bash
# The whole pipeline on CPU in a few minutes, offline:
#   tiny tokenizer + HF Llama + preference data -> HF->megatron (TP2) -> pairwise shards ->
#   DPO on 2 ranks (TP2, gloo) -> megatron->HF -> metrics plot.
# Writes into $OUT (default runs/quickstart): a new or empty folder, or one an earlier run made.
# Re-runnable: a re-run removes what the quickstart made there, and nothing else.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-$repo/runs/quickstart}"
cd "$repo"

# $OUT may come from the environment and name a folder of the user's: the marker file says this script
# made the folder, and a re-run removes only what the steps below write there (and the hidden staging
# folders a killed conversion leaves), never $OUT itself.
marker=".quickstart"
made=(hf_model tokenizer pairs.jsonl mg_tp2 convert.log data dpo tensorboard hf_dpo dpo_metrics.png)
if [[ -e "$OUT" && ! -d "$OUT" ]]; then
    echo "quickstart.sh: OUT=$OUT is not a folder; set OUT to a new or empty folder" >&2
    exit 1
fi
if [[ -d "$OUT" && ! -f "$OUT/$marker" && -n "$(ls -A "$OUT")" ]]; then
    echo "quickstart.sh: OUT=$OUT is not empty and was not made by the quickstart (no $marker file in it);" \
         "set OUT to a new or empty folder" >&2
    exit 1
fi
mkdir -p "$OUT"
echo "made by examples/tiny/quickstart.sh; a re-run removes what it made here, and nothing else" > "$OUT/$marker"
(cd "$OUT" && rm -rf -- "${made[@]}" .mg_tp2.staging-* .hf_dpo.staging-*)

echo "== [1/6] set up .venv"
bash scripts/setup_env.sh
py="$repo/.venv/bin/python"
export PYTHONWARNINGS="ignore::UserWarning"

echo "== [2/6] build a tiny tokenizer, a tiny HF Llama and 256 preference pairs (offline)"
"$py" examples/tiny/build_assets.py --out "$OUT"

echo "== [3/6] convert HF -> megatron-core (TP2)"
"$py" tools/checkpoint/convert_ckpt.py --model-type GPT --load-model-type hf --save-model-type mg \
    --load-dir "$OUT/hf_model" --save-dir "$OUT/mg_tp2" --target-tensor-parallel-size 2 \
    --target-pipeline-parallel-size 1 --make-vocab-size-divisible-by 16 | tee "$OUT/convert.log"
model_flags=$(grep -A1 "pretrain_dpo.py model flags" "$OUT/convert.log" | tail -n 1)

echo "== [4/6] tokenize the pairs with the llama3 template into indexed shards"
mkdir -p "$OUT/data"
"$py" preprocess_data.py --input "$OUT/pairs.jsonl" --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path "$OUT/hf_model" --handler-name AlpacaStylePairwiseHandler --prompt-type llama3 \
    --output-prefix "$OUT/data/pairs" --workers 2 --seq-length 128

echo "== [5/6] DPO on 2 CPU ranks (TP2)"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 "$py" -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29511}" \
    pretrain_dpo.py $model_flags --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 \
    --seq-length 128 --stage dpo --is-pairwise-dataset --data-path "$OUT/data/pairs" --split 94,6,0 \
    --dpo-loss-type sigmoid --dpo-beta 0.1 --micro-batch-size 4 --global-batch-size 16 --train-iters 30 \
    --lr 5e-4 --lr-warmup-iters 3 --lr-decay-style cosine --min-lr 5e-5 --weight-decay 0.0 --clip-grad 1.0 \
    --log-interval 1 --eval-interval 10 --eval-iters 1 \
    --load "$OUT/mg_tp2" --save "$OUT/dpo" --save-interval 15 --tensorboard-dir "$OUT/tensorboard"

echo "== [6/6] convert the trained policy back to HF and plot the metrics"
"$py" tools/checkpoint/convert_ckpt.py --model-type GPT --load-model-type mg --save-model-type hf \
    --load-dir "$OUT/dpo" --save-dir "$OUT/hf_dpo"
"$py" tools/plot_metrics.py "$OUT/dpo/metrics.jsonl" --output "$OUT/dpo_metrics.png" \
    --title "quickstart: DPO of a tiny Llama, TP2 on 2 CPU ranks"

echo "done: trained HF model in $OUT/hf_dpo, metrics in $OUT/dpo/metrics.jsonl, plot $OUT/dpo_metrics.png"
