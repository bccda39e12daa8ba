"""An MoE DPO step next to a dense model of the same active parameters, on CPU (or one GPU).

Builds a random Qwen3-MoE (E experts, top-k, expert width F) and a dense Qwen3 whose MLP width is k x F, so a
token meets the same number of MLP weights in both (the MoE adds its router); both are converted HF ->
megatron as users do and trained by `pretrain_dpo.py` on the same synthetic pairs (bench_dpo.py's data).
Reports step time, tokens/s, peak memory (CPU: the training process's peak RSS) and the parameter counts;
`--ep 2` also runs the MoE at expert parallel 2 (two ranks). Writes JSON.

    python benchmarks/bench_moe.py                  # CPU, a few minutes
    python benchmarks/bench_moe.py --ep 2           # plus the MoE at EP2 on two ranks
    python benchmarks/bench_moe.py --grouped-gemm   # GPU with transformer-engine: the experts as a grouped GEMM
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dpo import DATA_SHAPES, build_data, train_run  # noqa: E402 - the DPO benchmark's pairs and runs


def build(root: Path, name: str, args) -> tuple[list[str], int, int]:
    """(pretrain flags, total parameters, parameters a token meets) of the MoE or the dense model."""
    import transformers

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    common = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                  num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads // 4, head_dim=64,
                  max_position_embeddings=4 * args.seq_length, tie_word_embeddings=False)
    if name == "moe":
        config = transformers.Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.topk,
                                             moe_intermediate_size=args.expert_ffn, norm_topk_prob=True,
                                             intermediate_size=args.topk * args.expert_ffn)
    else:
        config = transformers.Qwen3Config(**common, intermediate_size=args.topk * args.expert_ffn)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    if name == "moe":  # all but top-k of each layer's experts are skipped by any one token
        per_expert = 3 * args.hidden_size * args.expert_ffn
        inactive = args.num_layers * (args.experts - args.topk) * per_expert
    model.save_pretrained(root / f"hf_{name}")
    flags = run_conversion(ConvertConfig(load_model_type="hf", save_model_type="mg", load_dir=str(root / f"hf_{name}"),
                                         save_dir=str(root / f"mg_{name}")))
    return flags, total, total - inactive


def run(root: Path, name: str, nproc: int, flags: list[str], prefix: str, args, extra: list[str]) -> dict:
    flags = [*flags, "--seq-length", str(args.seq_length), "--stage", "dpo", "--data-path", prefix, "--split", "100,0,0",
             "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
             "--train-iters", str(args.iters), "--lr", "1e-5", "--lr-decay-style", "constant", "--log-interval", "1",
             "--load", str(root / f"mg_{name.split('_')[0]}"), *extra]
    result = train_run(name, flags, root / f"run_{name}_{nproc}", nproc, 29700 + nproc, args.warmup)
    last = result["rows"][-1]
    return {"run": name, "ranks": nproc,
            **{k: result[k] for k in ("step_time_s", "tokens_per_s", "peak_memory_gib", "final_loss",
                                      "wall_s_including_startup")},
            **{k: last[k] for k in ("moe/load_balancing_loss",) if k in last}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--expert-ffn", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--max-answer", type=int, default=120)
    parser.add_argument("--data-shape", choices=list(DATA_SHAPES), default="short-prompt",
                        help="bench_dpo.py's synthetic pairs: short prompts, or prompts >= 60%% of the tokens")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ep", type=int, default=1, help="also run the MoE at this expert-parallel size")
    parser.add_argument("--grouped-gemm", action="store_true", help="GPU: --moe-grouped-gemm (transformer-engine)")
    parser.add_argument("--output", default="benchmarks/results/bench_moe.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    moe_extra = ["--moe-aux-loss-coeff", "0.001"] + (["--moe-grouped-gemm"] if args.grouped_gemm else [])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built = {name: build(root, name, args) for name in ("dense", "moe")}
        prefix = build_data(root, args)
        results = [run(root, "dense", 1, built["dense"][0], prefix, args, []),
                   run(root, "moe", 1, built["moe"][0], prefix, args, moe_extra)]
        if args.ep > 1:
            results.append(run(root, f"moe_ep{args.ep}", args.ep, built["moe"][0], prefix, args,
                               moe_extra + ["--expert-model-parallel-size", str(args.ep)]))
    for row in results:
        _, total, active = built[row["run"].split("_")[0]]
        row.update(parameters=total, active_parameters=active)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"device": device, "config": vars(args), "results": results}, indent=1))
    print(f"{device}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'run':<10}{'ranks':>6}{'params M':>10}{'active M':>10}{'step s':>8}{'tokens/s':>10}{'peak GiB':>10}")
    for r in results:
        print(f"{r['run']:<10}{r['ranks']:>6}{r['parameters'] / 1e6:>10.2f}{r['active_parameters'] / 1e6:>10.2f}"
              f"{r['step_time_s']:>8.3f}{r['tokens_per_s']:>10.0f}{r['peak_memory_gib']:>10.2f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
