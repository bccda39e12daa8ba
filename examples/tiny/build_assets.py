"""Builds the quickstart's inputs offline: a tiny llama3-style tokenizer, a random tiny HF Llama that
carries it, and a small learnable preference data set (JSONL).

Uses the same offline builders as the test suite, so the quickstart needs no hub access.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.assets import build_family_tokenizer_dir  # noqa: E402
from tests.e2e.dpo_assets import build_tiny_llama, learnable_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory to create the assets in")
    parser.add_argument("--pairs", type=int, default=256)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    hf_dir = out / "hf_model"
    tokenizer_dir = build_family_tokenizer_dir(out / "tokenizer", "llama3")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_tiny_llama(hf_dir, len(tokenizer))
    tokenizer.save_pretrained(hf_dir)  # the converter records it, and copies it back on mg -> hf
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        for record in learnable_pairs(args.pairs):
            f.write(json.dumps(record) + "\n")
    print(f"assets in {out}: hf_model/ (vocab {len(tokenizer)}), pairs.jsonl ({args.pairs} pairs)")


if __name__ == "__main__":
    main()
