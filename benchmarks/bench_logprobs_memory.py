"""Peak memory of token log-probs (forward + backward) as the sequence grows.

Compares, for bf16 logits [2, S, V]: the straightforward way (upcast the whole micro-batch's logits
to fp32, log_softmax, gather) with engine.dpo.logprobs (bf16 logits kept, fp32 chunk by chunk,
softmax recomputed in backward). Each case runs in a fresh process; the figure is the growth of
peak RSS (CPU) or max allocated memory (CUDA) over the logits tensor itself, i.e. what the
log-prob computation adds (the bf16 gradient of the logits, the same size as the logits, is part of
it in both cases). Prints a table and writes JSON.

    python benchmarks/bench_logprobs_memory.py [--vocab 32000] [--lengths 1024 4096 8192]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(method: str, length: int, vocab: int) -> None:
    """One measurement: prints the bytes added to the peak beyond the logits."""
    import torch

    sys.path.insert(0, str(REPO))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if method == "chunked":
        from engine.arguments import ParallelConfig
        from engine.dpo.logprobs import vocab_parallel_logprobs
        from engine.initialize import initialize_distributed

        initialize_distributed(ParallelConfig())
    # Drawn in bf16 directly: an fp32 temporary would raise the baseline peak and hide what follows.
    logits = torch.empty(2, length, vocab, device=device, dtype=torch.bfloat16).normal_().requires_grad_(True)
    labels = torch.randint(0, vocab, (2, length), device=device)
    weights = torch.randn(2, length, device=device)
    baseline = _peak_bytes(device)
    if method == "naive":
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        logp = vocab_parallel_logprobs(logits, labels, vocab)
    (logp * weights).sum().backward()
    print(json.dumps({"added_bytes": _peak_bytes(device) - baseline,
                      "logits_bytes": logits.numel() * logits.element_size()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--output", default="benchmarks/results/bench_logprobs_memory.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    rows = []
    for length in args.lengths:
        row = {"seq_length": length, "vocab": args.vocab}
        for method in ("naive", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(length), str(args.vocab)],
                                 capture_output=True, text=True, check=True,
                                 env={"MASTER_PORT": "29650", "PYTHONWARNINGS": "ignore",
                                      "PATH": "/usr/bin:/bin"})
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"{method}_added_gib"] = measured["added_bytes"] / 2**30
            row["logits_gib"] = measured["logits_bytes"] / 2**30
        rows.append(row)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))
    print(f"{'seq':>6}{'vocab':>8}{'bf16 logits GiB':>17}{'naive adds GiB':>16}{'chunked adds GiB':>18}")
    for r in rows:
        print(f"{r['seq_length']:>6}{r['vocab']:>8}{r['logits_gib']:>17.2f}{r['naive_added_gib']:>16.2f}"
              f"{r['chunked_added_gib']:>18.2f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
