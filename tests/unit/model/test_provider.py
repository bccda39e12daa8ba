"""The model provider on one rank: what it builds for the policy, the frozen reference and LoRA."""

from __future__ import annotations

from datetime import timedelta

import torch

from tests.distributed.harness import run_ranks

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 48 --seq-length 16 --vocab-size 100 --make-vocab-size-divisible-by 64 --swiglu "
        "--disable-bias-linear --untie-embeddings-and-output-weights").split()


def _expected_parameters(hidden=32, ffn=48, heads=4, groups=2, layers=2, padded_vocab=128) -> int:
    head_dim = hidden // heads
    qkv = hidden * (heads + 2 * groups) * head_dim
    per_layer = qkv + heads * head_dim * hidden + hidden * 2 * ffn + ffn * hidden + 2 * hidden  # + two norms
    return 2 * padded_vocab * hidden + layers * per_layer + hidden  # embedding, output layer, final norm


def _describe(argv):
    from torch.distributed import distributed_c10d

    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed
    from engine.model.provider import build_frozen_model, build_trainable_model, unwrap_model

    config = parse_args(argv, world_size=1)
    platform = initialize_distributed(config.parallel)
    policy, frozen = build_trainable_model(config, platform), build_frozen_model(config, platform)
    trainable = {n for chunk in policy for n, p in chunk.named_parameters() if p.requires_grad}
    return {
        "chunks": len(policy),
        "parameters": sum(p.numel() for p in unwrap_model(policy[0]).parameters()),
        "dtypes": {p.dtype for p in unwrap_model(policy[0]).parameters()},
        "trainable": trainable,
        "grad_buffers": sum(len(chunk.buffers) for chunk in policy),
        "grad_reduce_in_fp32": policy[0].ddp_config.grad_reduce_in_fp32,
        "frozen_trainable": sum(p.requires_grad for chunk in frozen for p in chunk.parameters()),
        "frozen_training": any(chunk.training for chunk in frozen),
        "padded_vocab": unwrap_model(policy[0]).embedding.word_embeddings.weight.shape[0],
        # --distributed-timeout-minutes, as the gloo backend of the default group holds it.
        "timeout": distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout,
    }


def test_policy_and_frozen_reference_on_one_rank():
    built = run_ranks(_describe, 1, TINY)[0]
    assert built["chunks"] == 1 and built["padded_vocab"] == 128  # 100 rounded up to 64 x TP1
    assert built["parameters"] == _expected_parameters()
    assert built["dtypes"] == {torch.float32} and built["grad_buffers"] >= 1 and not built["grad_reduce_in_fp32"]
    assert len(built["trainable"]) > 0
    assert built["frozen_trainable"] == 0 and not built["frozen_training"]
    assert built["timeout"] == timedelta(minutes=10)  # --distributed-timeout-minutes' default


def test_bf16_params_and_lora_trains_only_adapters():
    bf16 = run_ranks(_describe, 1, TINY + ["--bf16"])[0]
    assert bf16["dtypes"] == {torch.bfloat16} and bf16["parameters"] == _expected_parameters()
    assert bf16["grad_reduce_in_fp32"]  # docs/parallelism.md's memory estimate counts a 4-byte gradient buffer
    lora = run_ranks(_describe, 1, TINY + "--lora-r 4 --lora-alpha 8 --distributed-timeout-minutes 3".split())[0]
    assert lora["timeout"] == timedelta(minutes=3)
    assert lora["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in lora["trainable"])
    # Two adapters (A, B) on each of the four linears of each of the two layers.
    assert len(lora["trainable"]) == 2 * 4 * 2


def _grad_sync_error(argv):
    """The error megatron's DDP raises when the policy's gradients are NaN, or None."""
    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed
    from engine.model.provider import build_trainable_model

    config = parse_args(argv, world_size=1)
    chunk = build_trainable_model(config, initialize_distributed(config.parallel))[0]
    chunk.zero_grad_buffer()
    (sum(p.sum() for p in chunk.parameters() if p.requires_grad) * float("nan")).backward()
    try:
        chunk.finish_grad_sync()
    except RuntimeError as error:
        return str(error)
    return None


def test_check_for_nan_in_loss_and_grad_makes_megatrons_ddp_raise_on_nan_gradients():
    assert run_ranks(_grad_sync_error, 1, TINY)[0] is None  # without the flag the NaN reaches the skip guard
    error = run_ranks(_grad_sync_error, 1, TINY + ["--check-for-nan-in-loss-and-grad"])[0]
    assert "found NaN in local grad norm" in error
