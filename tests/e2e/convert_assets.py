"""Tiny random HF models of every family, and the rank function that runs a converted checkpoint.

Module level, so spawned gloo ranks can import `converted_logits`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

TINY = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
# Each family covers a corner: llama3 rope scaling + untied; mistral untied; qwen2 qkv bias + tied;
# qwen3 qk-norm with head_dim != hidden / heads; llama2 plain multi-head attention.
FAMILY_CONFIGS = {
    "llama3": ("LlamaConfig", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", dict(sliding_window=None, rope_parameters=dict(rope_type="default",
                                                                               rope_theta=1000000.0))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rms_norm_eps=1e-6)),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4)),
}
PARITY_FAMILIES = ("llama3", "mistral", "qwen2", "qwen3")


def build_tiny_hf_model(family: str, path: Path, seed: int = 0) -> Path:
    """save_pretrained of a random-init model; norms and biases are randomized too, so a mapping
    mix-up of any tensor moves the logits."""
    import transformers

    config_class, overrides = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


MOE_BASE = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
MOE_CONFIGS = {  # each family's routing corner: normalized top-k, softmax-then-top-k with a shared expert
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True, head_dim=16, rms_norm_eps=1e-6)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=32, norm_topk_prob=False,
                                         tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


def build_tiny_moe(family: str, path: Path, seed: int, **overrides) -> Path:
    """save_pretrained of a random tiny MoE model of `family` (transformers writes one tensor per expert
    projection); `overrides` change its config (e.g. the vocabulary of a tokenizer)."""
    import transformers

    config_class, family_overrides = MOE_CONFIGS[family]
    config = getattr(transformers, config_class)(**{**MOE_BASE, **family_overrides, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def hf_greedy(path: Path, prompt: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def converted_logits(runs: list[tuple[list[str], str]], tokens: torch.Tensor, te_standins: bool = False) -> list | None:
    """For each (pretrain flags, converted checkpoint root): build the model from the flags, load this
    rank's file strictly (in the model's own spelling, local or TE, as training does), and return the
    logits gathered over TP on the last stage (None elsewhere). `te_standins`: the TE spec can be built,
    with tests/te_standins.py's CPU stand-ins for TE's layers."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_frozen_model, unwrap_model
    from engine.checkpoint.layout import discover_parallel_layout, load_rank_state
    from engine.checkpoint.sharding import select_experts
    from engine.model.spelling import match_spelling

    if te_standins:
        from tests import te_standins as standins

        standins.install()
    world = int(os.environ["WORLD_SIZE"])
    configs = [parse_args(flags, world_size=world) for flags, _ in runs]
    platform = initialize_distributed(configs[0].parallel)
    set_random_seeds(1234)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    results = []
    for config, (_, root) in zip(configs, runs):
        (chunk,) = build_frozen_model(config, platform)
        pp, ep = config.parallel.pipeline_model_parallel_size, config.parallel.expert_model_parallel_size
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        saved_ep = discover_parallel_layout(root, 1, expert_parallel=ep > 1 and pp == 1)[2]
        state = load_rank_state(root, 1, tp_rank, pp_rank, pp, ep_rank=ep_rank if saved_ep > 1 else 0, ep_size=saved_ep)
        if saved_ep != ep:  # converted without expert parallelism: this EP rank's experts
            state["model"] = select_experts(state["model"], config.moe.num_experts, ep, ep_rank)
        model = unwrap_model(chunk)
        model.load_state_dict(match_spelling(state["model"], model.state_dict()), strict=True)

        def forward_step(data_iterator, model):
            output = model(next(data_iterator), positions, None)
            return output, lambda out, non_loss_data=False: gather_from_tensor_model_parallel_region(out)

        collected = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(list(tokens.split(1))), model=[chunk],
            num_microbatches=tokens.shape[0], seq_length=tokens.shape[1], micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True,
        )
        if parallel_state.is_pipeline_last_stage() and tp_rank == 0:
            results.append(torch.cat(collected)[..., : config.model.vocab_size].clone())
    return results if results else None
