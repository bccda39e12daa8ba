"""The local and TE spellings of a megatron-core state dict (engine/model/spelling.py)."""

from __future__ import annotations

import pytest

from engine.model.spelling import match_spelling, te_spelling, to_spelling

LOCAL = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.input_layernorm.bias",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.0.self_attention.linear_qkv._extra_state",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.pre_mlp_layernorm.bias",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc1.lora_A.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.layers.12.input_layernorm.weight",
    "decoder.layers.12.self_attention.linear_qkv.weight",
    "decoder.layers.12.pre_mlp_layernorm.weight",
    "decoder.layers.12.mlp.linear_fc1.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]
TE = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.0.self_attention.linear_qkv._extra_state",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc1.lora_A.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.layers.12.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.12.self_attention.linear_qkv.weight",
    "decoder.layers.12.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.12.mlp.linear_fc1.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]


def test_local_and_te_names_map_one_to_one_keeping_values_and_order():
    local = {key: object() for key in LOCAL}
    te = to_spelling(local, te=True)
    assert list(te) == TE
    assert all(te[t] is local[k] for k, t in zip(LOCAL, TE))  # no copies
    assert list(to_spelling(te, te=False)) == LOCAL
    assert to_spelling(te, te=True) == te and to_spelling(local, te=False) == local  # idempotent


def test_spelling_is_detected_and_a_mix_is_refused():
    assert te_spelling(LOCAL) is False and te_spelling(TE) is True
    assert te_spelling(["embedding.word_embeddings.weight"]) is None
    with pytest.raises(ValueError, match="both TE-fused norms"):
        te_spelling(LOCAL[:2] + TE[1:2])


def test_a_norm_is_fused_only_into_a_linear_that_is_there():
    # MoE layer: megatron's TE spec keeps pre_mlp_layernorm (no linear_fc1 to fuse it into)
    moe = {"decoder.layers.0.pre_mlp_layernorm.weight": 1, "decoder.layers.0.mlp.router.weight": 2,
           "decoder.layers.0.input_layernorm.weight": 3, "decoder.layers.0.self_attention.linear_qkv.weight": 4}
    assert list(to_spelling(moe, te=True)) == [
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.router.weight",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_qkv.weight"]


def test_match_spelling_follows_the_model_and_drops_extra_state_it_lacks():
    checkpoint = dict.fromkeys(TE + ["decoder.layers.0.self_attention.core_attention._extra_state"], 0)
    local_model = LOCAL  # local linears have _extra_state, local attention has none
    loaded = match_spelling(checkpoint, local_model)
    assert sorted(loaded) == sorted(LOCAL)
    assert sorted(match_spelling(dict.fromkeys(LOCAL, 0), TE)) == sorted(TE)
    stage = ["embedding.word_embeddings.weight"]  # names nothing: left as is
    assert match_spelling({"embedding.word_embeddings.weight": 1}, stage) == {"embedding.word_embeddings.weight": 1}
