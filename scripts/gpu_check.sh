#!/usr/bin/env bash
# The GPU check: one command on a machine with one CUDA GPU, about 8 minutes on an H100/H200-class GPU before the
# long-prompt benchmark (step 4) was added; not yet timed with it.
#
#   1. checks the environment: a CUDA build of torch that sees a GPU, megatron-core (installed from
#      MCORE_WHEEL_DIR when it does not import, with a line saying so), transformer-engine (optional:
#      without it the TE tests skip and the runs use the local spec), transformers and pytest;
#   2. runs the GPU test tier: pytest -m cuda tests/cuda (the --shared-prompt kernels among them);
#   3. benchmarks DPO on a ~1.1B Llama shape (hidden 2048, 22 layers, 32 heads in 4 KV groups, FFN 5632,
#      vocab 32000), bf16, sequences up to 2048, short prompts, in four modes (online reference + padding,
#      online + packing, precomputed reference + packing, the same with --shared-prompt): tokens/s, TFLOP/s and
#      MFU against a bf16 matmul peak measured here, as a table and as JSON;
#   4. the same model on long prompts (500-1500 tokens, answers 83-500): precomputed reference + packing with
#      and without --shared-prompt (its one flash varlen attention call per layer).
#
# Usage: bash scripts/gpu_check.sh [--dry-run] [--skip-tests] [--skip-bench]
#   --dry-run     print the checks' results and the plan, run nothing, install nothing; exit 2 if not ready
# Environment:
#   PYTHON            interpreter to use (default: the repo's .venv/bin/python if present, else python3)
#   MCORE_WHEEL_DIR   a directory of wheels to install megatron-core from (pip --no-index) if it does not import
#   GPU_CHECK_OUT     where the JSON and logs go (default: benchmarks/results)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
dry_run=0 tests=1 bench=1
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --skip-tests) tests=0 ;;
        --skip-bench) bench=0 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 64 ;;
    esac
done
if [ -n "${PYTHON:-}" ]; then
    python="$PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
    python="$repo/.venv/bin/python"
else
    python=python3
fi
out="${GPU_CHECK_OUT:-$repo/benchmarks/results}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

tests_cmd=("$python" -m pytest -q -m cuda tests/cuda)
bench_cmd=("$python" benchmarks/bench_dpo.py --shape llama-1.1b --device cuda --output "$out/bench_dpo_gpu.json")
long_cmd=("$python" benchmarks/bench_dpo.py --shape llama-1.1b --device cuda --data-shape long-prompt --max-answer 500
          --modes precomputed_packed precomputed_packed_shared --output "$out/bench_dpo_gpu_long_prompt.json")

# Prints one "key value" line per fact; never fails on a missing package.
preflight() {
    "$python" -W ignore - <<'EOF'
import importlib, platform
print("python", platform.python_version())
try:
    import torch
except Exception as err:  # noqa: BLE001
    print("torch missing", type(err).__name__, err)
else:
    print("torch", torch.__version__, "cuda-build", torch.version.cuda or "none")
    print("cuda-available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("gpus", torch.cuda.device_count(), torch.cuda.get_device_name())
for name in ("megatron.core", "transformers", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, "ok", getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "missing", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
try:
    from engine.model import compat
    info = compat.describe()
    print("transformer-engine", "yes" if info["transformer_engine"] else "no", "-", info["transformer_engine_detail"])
    print("fusions rope", info["rope_fusion"], "grad-accum", info["grad_accum_fusion"])
    for problem in info["api_problems"]:
        print("megatron-api-problem", problem)
except Exception as err:  # noqa: BLE001
    print("transformer-engine unknown", type(err).__name__, err)
EOF
}

echo "[gpu_check] python: $python"
facts="$(preflight)"
echo "$facts" | sed 's/^/[gpu_check]   /'
problems=()
has() { grep -q "^$1" <<<"$facts"; }
if has "torch missing"; then
    problems+=("torch does not import: install a CUDA build of torch (pip install torch, or the NGC container)")
elif has "torch .* cuda-build none"; then
    problems+=("torch is a CPU build: install a CUDA build of torch")
elif has "cuda-available False"; then
    problems+=("no CUDA GPU is visible to torch (check nvidia-smi and CUDA_VISIBLE_DEVICES); this check needs one")
fi
if has "megatron.core missing"; then
    if [ -n "${MCORE_WHEEL_DIR:-}" ]; then
        if [ "$dry_run" = 1 ]; then
            echo "[gpu_check] megatron-core does not import: would install it from MCORE_WHEEL_DIR=$MCORE_WHEEL_DIR"
        else
            echo "[gpu_check] megatron-core does not import: installing it from MCORE_WHEEL_DIR=$MCORE_WHEEL_DIR (no index)"
            "$python" -m pip install --no-index --find-links "$MCORE_WHEEL_DIR" megatron-core
            facts="$(preflight)"
            has "megatron.core missing" && problems+=("megatron-core still does not import after installing from $MCORE_WHEEL_DIR")
        fi
    else
        problems+=("megatron-core does not import: pip install 'megatron-core>=0.15,<0.20' (Python >= 3.12; <0.17 on 3.11), or set MCORE_WHEEL_DIR to a directory holding its wheel")
    fi
fi
has "transformers missing" && problems+=("transformers does not import (the tests build tiny HF models): pip install -e '.[dev]'")
has "pytest missing" && [ "$tests" = 1 ] && problems+=("pytest does not import: pip install -e '.[dev]'")
has "megatron-api-problem" && echo "[gpu_check] warning: megatron-core lacks part of the API the engine calls (see above)"

echo "[gpu_check] plan:"
[ "$tests" = 1 ] && echo "[gpu_check]   1. GPU tests: ${tests_cmd[*]}"
[ "$bench" = 1 ] && echo "[gpu_check]   2. benchmark: ${bench_cmd[*]}"
[ "$bench" = 1 ] && echo "[gpu_check]   3. long-prompt benchmark: ${long_cmd[*]}"
if [ "${#problems[@]}" -gt 0 ]; then
    for problem in "${problems[@]}"; do echo "gpu_check.sh: error: $problem" >&2; done
    exit 2
fi
if [ "$dry_run" = 1 ]; then
    echo "[gpu_check] ready (dry run: nothing was run)"
    exit 0
fi

mkdir -p "$out"
status=0
start=$SECONDS
if [ "$tests" = 1 ]; then
    echo "[gpu_check] running the GPU tests"
    "${tests_cmd[@]}" 2>&1 | tee "$out/gpu_tests.log" || status=$?
    echo "[gpu_check] GPU tests: exit $status after $((SECONDS - start)) s (log: $out/gpu_tests.log)"
fi
if [ "$bench" = 1 ]; then
    echo "[gpu_check] running the benchmark"
    bench_status=0
    "${bench_cmd[@]}" || bench_status=$?
    echo "[gpu_check] benchmark: exit $bench_status (JSON: $out/bench_dpo_gpu.json)"
    [ "$status" = 0 ] && status=$bench_status
    echo "[gpu_check] running the long-prompt benchmark"
    bench_status=0
    "${long_cmd[@]}" || bench_status=$?
    echo "[gpu_check] long-prompt benchmark: exit $bench_status (JSON: $out/bench_dpo_gpu_long_prompt.json)"
    [ "$status" = 0 ] && status=$bench_status
fi
echo "[gpu_check] done in $((SECONDS - start)) s, exit $status"
exit "$status"
