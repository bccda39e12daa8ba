"""DPO throughput: online reference + padding vs online + packing vs precomputed reference + packing (vs the same
with --shared-prompt), on short- or long-prompt data (--data-shape).

Builds a random Llama-shaped model of the requested size (HF -> megatron conversion, as users do),
a synthetic preference set whose sequence lengths spread 10x, and runs `pretrain_dpo.py` for each
mode on the same data. Reports pairs/s, tokens/s, TFLOP/s per device (formula in
engine/training/metrics.py: causal attention counted as half of full), MFU against a peak that is
measured here (a large fp32/bf16 matmul) unless --peak-tflops is given, and peak memory (CPU: peak
RSS of the training process; CUDA: max allocated). Figures are totals over the iterations after
--warmup, which are the same batches in every mode; with --repeats the modes run in turn that many
times and each keeps its fastest run. Prints a table and writes JSON.

    python benchmarks/bench_dpo.py                          # CPU, ~10M params, a few minutes
    python benchmarks/bench_dpo.py --shape llama-1.1b       # one GPU: TinyLlama-1.1B shape, bf16, seq 2048
    python benchmarks/bench_dpo.py --hidden-size 2048 --num-layers 16 --nproc 1 --bf16   # any shape
    python benchmarks/bench_dpo.py --shape llama-1.1b --device cuda --data-shape long-prompt --max-answer 500 \
        --modes precomputed_packed precomputed_packed_shared      # prompts 500-1500 tokens, answers 83-500

--device picks where everything runs (auto: the GPU when torch sees one); --device cpu hides the GPUs from the
training processes too.

A --shape preset sets the model, sequence and batch flags (each can still be given explicitly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # --shape presets: bench_dpo.py flag defaults
    # TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads in 4 KV groups, FFN 5632, vocab 32000), bf16,
    # sequences up to 2048 tokens; sized for one GPU in scripts/gpu_check.sh's time budget.
    "llama-1.1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_query_groups=4, ffn_hidden_size=5632,
                       vocab_size=32000, seq_length=2048, max_answer=1900, pairs=128, micro_batch_size=4,
                       global_batch_size=16, iters=6, warmup=2, bf16=True),
}

MODES = {  # name -> extra flags
    "online_padded": [],
    "online_packed": ["--pack-sequences"],
    "precomputed_packed": ["--pack-sequences", "--precompute-ref-logps"],
    "precomputed_packed_shared": ["--pack-sequences", "--precompute-ref-logps", "--shared-prompt"],
}


def measure_peak_tflops(bf16: bool, device: str) -> float:
    """Dense matmul throughput of `device`: the denominator of MFU when no datasheet peak applies.

    The best of several timed trials, so that a noisy moment does not lower the peak (and lift MFU).
    """
    dtype = torch.bfloat16 if bf16 and device == "cuda" else torch.float32
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    repeats = 20 if device == "cuda" else 3
    best = 0.0
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                       intermediate_size=args.ffn_hidden_size or int(args.hidden_size * 8 / 3 // 64 * 64),
                       num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                       num_key_value_heads=args.num_query_groups or max(1, args.num_heads // 4),
                       max_position_embeddings=4 * args.seq_length, tie_word_embeddings=False)


def build_model(root: Path, args) -> list[str]:
    from transformers import LlamaForCausalLM

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    # Random init on the GPU when there is one (a 1.1B init on CPU takes a while), saved in bf16 for --bf16.
    with torch.device(args.device):
        model = LlamaForCausalLM(llama_config(args))
    if args.bf16:
        model = model.to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "hf")
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the training processes need the GPU
    flags = run_conversion(ConvertConfig(load_model_type="hf", save_model_type="mg", load_dir=str(root / "hf"),
                                         save_dir=str(root / "mg"), target_tensor_parallel_size=args.tp,
                                         target_pipeline_parallel_size=args.pp))
    return flags, parameters


DATA_SHAPES = {  # --data-shape: (prompt lengths, answer lengths as fractions of --max-answer), both inclusive
    # Short prompts, answers spread 10x: chat-style preference data.
    "short-prompt": ((8, 32), (0.1, 1.0)),
    # Prompts >= 60% of the tokens (summarisation, RAG, multi-turn history): prompts 3-9x --max-answer / 3,
    # answers from 1/6 to all of --max-answer (300-900 and 50-300 at --max-answer 300).
    "long-prompt": (None, (1 / 6, 1.0)),
}


def build_data(root: Path, args) -> str:
    """Random token pairs: short-prompt: prompt 8-32 tokens, answers from L/10 to L (a 10x spread), L =
    --max-answer; long-prompt: prompts L to 3L, answers L/6 to L."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from engine.formats import OUTPUT_KEYS, output_path_prefix

    rng = np.random.default_rng(0)
    prefix = str(root / "data" / "pairs")
    (root / "data").mkdir()
    builders = {key: IndexedDatasetBuilder(output_path_prefix(prefix, key) + ".bin", dtype=np.int32)
                for key in OUTPUT_KEYS}
    prompts, (low, high) = DATA_SHAPES[args.data_shape]
    prompts = prompts or (args.max_answer, 3 * args.max_answer)
    low, high = max(1, int(args.max_answer * low)), int(args.max_answer * high)
    for _ in range(args.pairs):
        prompt = rng.integers(3, args.vocab_size, rng.integers(prompts[0], prompts[1] + 1))
        for side in ("chosen", "rejected"):
            answer = rng.integers(3, args.vocab_size, rng.integers(low, high + 1))
            ids = np.concatenate([prompt, answer]).astype(np.int32)
            labels = np.concatenate([np.full(prompt.size, -100), answer]).astype(np.int32)
            builders[f"{side}_input_ids"].add_document(ids, [ids.size])
            builders[f"{side}_labels"].add_document(labels, [labels.size])
    for key, builder in builders.items():
        builder.finalize(output_path_prefix(prefix, key) + ".idx")
    return prefix


def train_run(name: str, flags: list[str], save: Path, nproc: int, port: int, warmup: int,
              hide_gpus: bool = False) -> dict:
    """`pretrain_dpo.py FLAGS --save SAVE` under torchrun (one OpenMP share of the cores per rank), and its
    figures over the iterations after `warmup`: seconds, mean step time, tokens/s (weighted by step time), the
    peak memory of any iteration, the last loss, the wall time, and the metric rows themselves."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(port), str(REPO / "pretrain_dpo.py"), *flags, "--save", str(save)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the engine trains on the GPU whenever torch sees one
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-4000:]}")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steady = rows[warmup:]
    seconds = sum(r["step_time_s"] for r in steady)
    return {"rows": rows, "steady": steady, "seconds": seconds, "step_time_s": seconds / len(steady),
            "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in steady) / seconds,
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows), "final_loss": rows[-1]["loss"],
            "wall_s_including_startup": wall}


def run_mode(root: Path, name: str, repeat: int, model_flags: list[str], prefix: str, args, peak: float) -> dict:
    flags = [*model_flags, "--seq-length", str(args.seq_length), "--stage", "dpo", "--data-path", prefix,
             "--split", "100,0,0", "--tensor-model-parallel-size", str(args.tp),
             "--pipeline-model-parallel-size", str(args.pp), "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
             "--lr", "1e-5", "--lr-decay-style", "constant", "--log-interval", "1",
             "--load", str(root / "mg"), "--peak-tflops", str(peak), *MODES[name], *args.train_args.split()]
    if args.bf16:
        flags.append("--bf16")
    run = train_run(name, flags, root / f"{name}_{repeat}", args.nproc, 29600 + list(MODES).index(name), args.warmup,
                    hide_gpus=args.device == "cpu")
    # Every mode trains on the same batches in the same order: totals over the same iterations
    # compare like with like, whatever each batch's own length.
    steady, seconds = run["steady"], run["seconds"]
    tflops = sum(r["tflops_per_device"] * r["step_time_s"] for r in steady) / seconds
    return {
        "mode": name,
        "pairs_per_s": args.global_batch_size * len(steady) / seconds,
        "tokens_per_s": run["tokens_per_s"],
        "tflops_per_device": tflops,
        "mfu": tflops / peak,
        "step_time_s": run["step_time_s"],
        "peak_memory_gib": run["peak_memory_gib"],
        "wall_s_including_startup": run["wall_s_including_startup"],
        "final_loss": run["final_loss"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), help="a preset of the model, sequence and batch flags")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-query-groups", type=int, help="KV heads; default num-heads / 4")
    parser.add_argument("--ffn-hidden-size", type=int)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=512, help="packing row capacity and truncation length")
    parser.add_argument("--max-answer", type=int, default=200)
    parser.add_argument("--data-shape", choices=list(DATA_SHAPES), default="short-prompt",
                        help="short-prompt: prompts 8-32 tokens, answers --max-answer / 10 to --max-answer; "
                             "long-prompt: prompts --max-answer to 3x, answers --max-answer / 6 to --max-answer")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first iterations left out of the figures")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating modes; the fastest counts")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model is built, the peak measured and the modes trained; auto: cuda when "
                             "torch sees a GPU")
    parser.add_argument("--peak-tflops", type=float, help="default: measured with a dense matmul here")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="the first is the baseline of the speed-up column")
    parser.add_argument("--train-args", default="",
                        help="more pretrain_dpo.py flags for every mode, e.g. '--transformer-impl local'")
    parser.add_argument("--output", default="benchmarks/results/bench_dpo.json")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--shape's preset becomes the defaults; flags given explicitly still win."""
    parser = build_parser()
    shape = parser.parse_known_args(argv)[0].shape
    if shape:
        parser.set_defaults(**SHAPES[shape])
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU (a CPU build of torch, or CUDA_VISIBLE_DEVICES)")
    prompts = DATA_SHAPES[args.data_shape][0] or (args.max_answer, 3 * args.max_answer)
    if prompts[1] + args.max_answer > args.seq_length:  # a truncated pair is no longer the shape it names
        parser.error(f"--data-shape {args.data_shape} makes pairs of up to {prompts[1] + args.max_answer} tokens at "
                     f"--max-answer {args.max_answer}, over --seq-length {args.seq_length}: lower --max-answer")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    peak = args.peak_tflops or measure_peak_tflops(args.bf16, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_flags, parameters = build_model(root, args)
        prefix = build_data(root, args)
        runs = [run_mode(root, name, repeat, model_flags, prefix, args, peak)
                for repeat in range(args.repeats) for name in args.modes]  # alternating: A B C A B C
    # Background load only ever slows a run down: keep each mode's fastest repeat.
    results = [max((r for r in runs if r["mode"] == name), key=lambda r: r["pairs_per_s"]) for name in args.modes]
    baseline = results[0]["pairs_per_s"]
    for row in results:
        row["speedup_vs_baseline"] = row["pairs_per_s"] / baseline
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    report = {"device": device, "parameters": parameters, "peak_tflops": peak, "baseline_mode": args.modes[0],
              "peak_source": "--peak-tflops" if args.peak_tflops else "measured dense matmul",
              "config": vars(args), "results": results, "all_runs": runs}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(f"{device}, {parameters / 1e6:.1f}M parameters, peak {peak:.3f} TFLOP/s ({report['peak_source']})")
    header = f"{'mode':<20}{'pairs/s':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'step s':>8}{'peak GiB':>10}{'speedup':>9}"
    print(header)
    for r in results:
        print(f"{r['mode']:<20}{r['pairs_per_s']:>10.2f}{r['tokens_per_s']:>11.0f}{r['tflops_per_device']:>9.4f}"
              f"{r['mfu']:>8.1%}{r['step_time_s']:>8.3f}{r['peak_memory_gib']:>10.2f}"
              f"{r['speedup_vs_baseline']:>8.2f}x")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
