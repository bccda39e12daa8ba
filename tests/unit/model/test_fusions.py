"""megatron's kernel fusions in the TransformerConfig: on for CUDA where their kernels exist, off on CPU.

CUDA is a Platform record here (no GPU needed): the point is which flags the provider asks for, and that
megatron-core's own TransformerConfig checks accept them.
"""

from __future__ import annotations

import pytest

from engine.arguments import parse_args
from engine.model import compat
from engine.model.provider import fusions, transformer_config
from engine.platform import Platform

CUDA, CPU = Platform("cuda", "nccl"), Platform("cpu", "gloo")
LLAMA = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--vocab-size 128 --swiglu --normalization RMSNorm --disable-bias-linear --position-embedding-type rope "
         "--micro-batch-size 1").split()
ALL_OFF = dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
               persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)


@pytest.fixture
def kernels(monkeypatch):
    """A CUDA machine with TE's rope kernel and apex's wgrad-accumulation extension."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(compat, "rope_fusion_available", lambda: True)
    monkeypatch.setattr(compat, "grad_accum_fusion_available", lambda: True)
    # what megatron's TransformerConfig.__post_init__ itself checks for apply_rope_fusion
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)


def test_cpu_runs_unfused():
    config = parse_args(LLAMA, world_size=1)
    for impl in ("local", "transformer_engine"):
        assert fusions(config, CPU, impl) == ALL_OFF
    tf = transformer_config(config, CPU)
    assert not (tf.bias_activation_fusion or tf.apply_rope_fusion or tf.gradient_accumulation_fusion)


def test_cuda_with_te_turns_on_swiglu_rope_and_wgrad_fusion(kernels):
    config = parse_args(LLAMA, world_size=1)
    tf = transformer_config(config, CUDA, "transformer_engine")  # megatron's own checks accept the set
    assert tf.bias_activation_fusion and tf.bias_dropout_fusion and tf.apply_rope_fusion
    assert tf.gradient_accumulation_fusion
    assert not tf.masked_softmax_fusion and not tf.persist_layer_norm
    assert not tf.use_cpu_initialization


def test_wgrad_fusion_only_with_te_spec_and_its_kernel(kernels, monkeypatch):
    config = parse_args(LLAMA, world_size=1)
    assert not fusions(config, CUDA, "local")["gradient_accumulation_fusion"]  # LoRA / local runs
    monkeypatch.setattr(compat, "grad_accum_fusion_available", lambda: False)
    assert not fusions(config, CUDA, "transformer_engine")["gradient_accumulation_fusion"]


def test_rope_fusion_needs_the_kernel_and_rope(monkeypatch):
    monkeypatch.setattr(compat, "rope_fusion_available", lambda: False)
    assert not fusions(parse_args(LLAMA, world_size=1), CUDA, "local")["apply_rope_fusion"]
    monkeypatch.setattr(compat, "rope_fusion_available", lambda: True)
    learned = [a if a != "rope" else "learned_absolute" for a in LLAMA]
    assert not fusions(parse_args(learned, world_size=1), CUDA, "local")["apply_rope_fusion"]


def test_gelu_without_bias_keeps_the_activation_unfused(kernels):
    """megatron refuses bias_activation_fusion for a bias-free, ungated GeLU MLP."""
    gelu = [a for a in LLAMA if a != "--swiglu"]
    config = parse_args(gelu, world_size=1)
    assert not fusions(config, CUDA, "local")["bias_activation_fusion"]
    transformer_config(config, CUDA, "local")
    with_bias = parse_args([a for a in gelu if a != "--disable-bias-linear"], world_size=1)
    assert transformer_config(with_bias, CUDA, "local").bias_activation_fusion


def test_deterministic_mode_reaches_megatron():
    assert not transformer_config(parse_args(LLAMA, world_size=1), CPU).deterministic_mode
    config = parse_args(LLAMA + ["--deterministic-mode"], world_size=1)
    assert config.training.deterministic_mode and transformer_config(config, CPU).deterministic_mode
