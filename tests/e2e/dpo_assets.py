"""Offline assets for DPO end-to-end tests: a tiny tokenizer, a tiny HF Llama, a learnable preference
data set, its shards, and a converted megatron checkpoint in any layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.assets import build_family_tokenizer_dir


def learnable_pairs(count: int) -> list[dict]:
    """Chosen answers share a pattern the rejected ones never use, so DPO can learn to prefer it."""
    colors = ["red", "blue", "green", "black", "white", "yellow", "brown", "pink"]
    return [
        {
            "instruction": f"Name a thing that is {colors[i % len(colors)]}, number {i}.",
            "input": "",
            "chosen": f"Sure! The {colors[i % len(colors)]} thing number {i} is a nice ball.",
            "rejected": f"No. {i}",
        }
        for i in range(count)
    ]


def build_tiny_llama(path: Path, vocab_size: int, seed: int = 0, num_layers: int = 4) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def build_preference_data(root: Path, pairs: int = 64) -> tuple[str, str]:
    """(tokenizer dir, data prefix): llama3 template shards of `learnable_pairs(pairs)`."""
    from engine.data.preprocess import PreprocessConfig, preprocess
    from engine.tokenizer import TokenizerConfig

    tokenizer_dir = build_family_tokenizer_dir(root / "tokenizer", "llama3")
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in learnable_pairs(pairs)))
    prefix = str(root / "data" / "pairs")
    (root / "data").mkdir()
    preprocess(PreprocessConfig(input=str(jsonl), output_prefix=prefix,
                                tokenizer=TokenizerConfig("PretrainedFromHF", tokenizer_dir),
                                prompt_type="llama3", log_interval=10**6))
    return tokenizer_dir, prefix


def convert(hf_dir: Path, save_dir: Path, tp: int = 1, pp: int = 1,
            num_layer_list: tuple[int, ...] | None = None) -> list[str]:
    """HF -> megatron at (tp, pp); returns the model flags convert_ckpt.py prints for pretrain_dpo.py."""
    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    return run_conversion(ConvertConfig(load_model_type="hf", save_model_type="mg", load_dir=str(hf_dir),
                                        save_dir=str(save_dir), target_tensor_parallel_size=tp,
                                        target_pipeline_parallel_size=pp, num_layer_list=num_layer_list,
                                        make_vocab_size_divisible_by=16))
