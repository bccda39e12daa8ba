"""LoRA DPO vs full DPO on the same model: trainable parameters, optimizer state, peak memory, step time.

    python benchmarks/bench_lora.py [--work-dir /tmp/bench_lora] [--steps 3] [--json out.json]

A random ~70M-parameter Llama (hidden 768, 10 layers, GQA 12/4, FFN 2048, 8k BPE vocab,
untied) is converted to megatron and trained with `pretrain_dpo.py` (one process, fp32,
seq 128, 2 pairs per step) twice: full DPO (policy + frozen reference copy) and LoRA DPO
(r 16, alpha 32, all four linears; reference = the base with adapters off). Each run is
its own process, so its peak RSS (ru_maxrss) is its own. Optimizer-state bytes are summed
from the Adam moments in the saved checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None)
LORA = ["--lora-r", "16", "--lora-alpha", "32", "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1",
        "linear_fc2"]


def build_assets(work: Path) -> tuple[str, Path, list[str]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.tokenizer import TokenizerConfig, build_tokenizer
    from tests.e2e.dpo_assets import build_preference_data, convert

    tokenizer_dir, prefix = build_preference_data(work, pairs=64)
    vocab = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_dir)).vocab_size
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **SHAPE)).save_pretrained(work / "hf")
    flags = convert(work / "hf", work / "mg")
    return prefix, work / "mg", flags


def run(name: str, work: Path, prefix: str, load: Path, flags: list[str], steps: int, extra: list[str]) -> dict:
    save = work / f"run_{name}"
    shutil.rmtree(save, ignore_errors=True)
    args = [sys.executable, "pretrain_dpo.py", *flags, "--seq-length", "128", "--data-path", prefix,
            "--load", str(load), "--save", str(save), "--split", "100,0,0", "--train-iters", str(steps),
            "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-4", "--log-interval", "1", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2",
                                                                              **__import__("os").environ})
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print(f"note: {name}'s peak RSS did not exceed an earlier child's; run it first for its own figure")
    import torch

    match = re.search(r"trainable parameters: (\d+) of (\d+)", done.stderr)
    state = torch.load(save / f"iter_{steps:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {
        "run": name,
        "trainable_params": int(match.group(1)),
        "total_params": int(match.group(2)),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in moments),
        "checkpoint_model_bytes": sum(t.numel() * t.element_size() for t in state["model"].values()
                                      if hasattr(t, "numel")),
        "peak_rss_mib": peak / 1024,
        "median_step_s": sorted(r["step_time_s"] for r in rows)[len(rows) // 2],
        "wall_s": wall,
        "losses": [r["loss"] for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/bench_lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prefix, load, flags = build_assets(work)
    # LoRA first: ru_maxrss of children is a running maximum, and the full run is the larger one.
    results = [run("lora", work, prefix, load, flags, args.steps, [*LORA, "--lora-ckpt-filter"]),
               run("full", work, prefix, load, flags, args.steps, [])]
    print(f"| run | trainable params | total params | optimizer state (MiB) | checkpoint weights (MiB) "
          f"| peak RSS (MiB) | median step (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} DPO | {r['trainable_params']:,} | {r['total_params']:,} "
              f"| {r['optimizer_state_bytes'] / 2**20:.2f} | {r['checkpoint_model_bytes'] / 2**20:.2f} "
              f"| {r['peak_rss_mib']:.0f} | {r['median_step_s']:.2f} |")
    lora, full = results
    print(f"LoRA/full: trainable {lora['trainable_params'] / full['trainable_params']:.4f}, optimizer state "
          f"{lora['optimizer_state_bytes'] / full['optimizer_state_bytes']:.4f}, peak RSS "
          f"{lora['peak_rss_mib'] / full['peak_rss_mib']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
