"""The HF <-> megatron tensor layouts and the family registry."""

from __future__ import annotations

import pytest
import torch

from engine.arguments import parse_args
from engine.convert.mapping import pack_qkv, unpack_qkv
from engine.model.families import (
    FAMILIES,
    UnsupportedModelError,
    detect_family,
    hf_config_kwargs,
    model_args,
    pretrain_flags,
)


def _rows(prefix: str, heads: int, head_dim: int) -> torch.Tensor:
    """Rows labelled head * 10 + row, offset by prefix, so their order is readable."""
    offset = {"q": 100, "k": 200, "v": 300}[prefix]
    return torch.tensor([[offset + h * 10 + r] for h in range(heads) for r in range(head_dim)], dtype=torch.float32)


def test_pack_qkv_stacks_q_heads_then_k_then_v_per_group():
    q, k, v = _rows("q", 4, 2), _rows("k", 2, 2), _rows("v", 2, 2)
    packed = pack_qkv(q, k, v, groups=2).flatten().tolist()
    assert packed == [100, 101, 110, 111, 200, 201, 300, 301,   # group 0: q heads 0-1, k0, v0
                      120, 121, 130, 131, 210, 211, 310, 311]   # group 1: q heads 2-3, k1, v1
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(pack_qkv(q, k, v, 2), 4, 2, 2), (q, k, v)))


def test_pack_qkv_handles_biases_and_multi_head_attention():
    q, k, v = torch.randn(12), torch.randn(12), torch.randn(12)
    packed = pack_qkv(q, k, v, groups=4)
    assert torch.equal(packed[:9], torch.cat([q[:3], k[:3], v[:3]]))
    assert all(torch.equal(a, b) for a, b in zip(unpack_qkv(packed, 4, 4, 3), (q, k, v)))


@pytest.mark.parametrize(("config", "family"), [
    ({"model_type": "llama"}, "llama2"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"model_type": "mistral"}, "mistral"),
    ({"model_type": "qwen2"}, "qwen2"),
    ({"model_type": "qwen3"}, "qwen3"),
    ({"model_type": "qwen3_moe"}, "qwen3_moe"),
    ({"model_type": "qwen2_moe"}, "qwen2_moe"),
    ({"model_type": "mixtral"}, "mixtral"),
])
def test_family_is_detected_from_config(config, family):
    assert detect_family(config).name == family


def test_unsupported_model_type_lists_the_supported_families():
    with pytest.raises(UnsupportedModelError, match="gpt2") as err:
        detect_family({"model_type": "gpt2"})
    assert all(name in str(err.value) for name in FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_config_and_model_args_round_trip_and_flags_parse(name):
    import transformers

    family = FAMILIES[name]
    args = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
            "group_query_attention": True, "num_query_groups": 2, "kv_channels": 32, "max_position_embeddings": 128,
            "rotary_base": 1000000, "rope_scaling_type": None, "normalization": "RMSNorm", "norm_epsilon": 1e-6,
            "swiglu": True, "disable_bias_linear": True, "add_qkv_bias": family.qkv_bias,
            "qk_layernorm": family.qk_norm, "untie_embeddings_and_output_weights": True, "vocab_size": 300}
    if name == "llama3":
        args.update(rope_scaling_type="llama3", rope_scaling_factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
    if family.moe:  # Mixtral's experts are its intermediate_size; Qwen2-MoE routes top-k of a full softmax
        args.update(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=96 if name == "mixtral" else 48,
                    moe_router_pre_softmax=name == "qwen2_moe")
        if family.shared_expert:
            args.update(moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True)
    hf = getattr(transformers, family.config_class)(**hf_config_kwargs(family, args)).to_dict()
    assert model_args(family, hf) == args
    config = parse_args(pretrain_flags(args) + ["--seq-length", "64"], world_size=1)
    assert config.model.num_query_groups == 2 and config.model.kv_channels == 32
    assert config.model.add_qkv_bias == family.qkv_bias and config.model.qk_layernorm == family.qk_norm
    assert config.moe.num_experts == args.get("num_experts")
    if family.moe:
        assert config.moe.moe_router_pre_softmax == args["moe_router_pre_softmax"]
        assert config.moe.moe_shared_expert_gate == family.shared_expert


@pytest.mark.parametrize(("extra", "message"), [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "llama3 scaling"),
])
def test_unsupported_architecture_features_are_named(extra, message):
    hf = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": 100, **extra}
    with pytest.raises(UnsupportedModelError, match=message):
        model_args(FAMILIES["llama2"], hf)


def test_mapping_writes_either_spelling_and_reads_both():
    from engine.convert.mapping import hf_to_mcore_units, mcore_to_hf_unit
    from engine.model.families import get_family
    from engine.model.spelling import te_spelling

    family = get_family("qwen3")
    args = model_args(family, dict(model_type="qwen3", num_hidden_layers=2, hidden_size=16, intermediate_size=24,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=32,
                                   max_position_embeddings=16, tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}

    def read(name, shape):
        return tensors.setdefault(name, torch.randn(shape, generator=g))

    local = list(hf_to_mcore_units(read, family, args))
    te = list(hf_to_mcore_units(read, family, args, te=True))
    assert te_spelling(local[1]) is False and te_spelling(te[1]) is True
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te[1]
    for a, b in zip(local, te):
        hf_a, hf_b = mcore_to_hf_unit(a, family, args), mcore_to_hf_unit(b, family, args)
        assert hf_a.keys() == hf_b.keys() and all(torch.equal(hf_a[k], hf_b[k]) for k in hf_a)
        assert all(torch.equal(hf_a[k], tensors[k]) for k in hf_a)


def test_convert_ckpt_transformer_impl_flag():
    import importlib.util
    from pathlib import Path

    from engine.convert.common import ConversionError, ConvertConfig

    path = Path(__file__).resolve().parents[3] / "tools" / "checkpoint" / "convert_ckpt.py"
    spec = importlib.util.spec_from_file_location("_convert_ckpt", path)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    base = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", "a", "--save-dir", "b"]
    assert convert.config_from_args(convert.build_parser().parse_args(base)).transformer_impl is None
    args = convert.build_parser().parse_args(base + ["--transformer-impl", "transformer_engine"])
    assert convert.config_from_args(args).transformer_impl == "transformer_engine"
    with pytest.raises(ConversionError, match="--transformer-impl names megatron weights"):
        ConvertConfig("mg", "hf", "a", "b", transformer_impl="local")
    with pytest.raises(ConversionError, match="--transformer-impl te: choose from local, transformer_engine"):
        ConvertConfig("hf", "mg", "a", "b", transformer_impl="te")


@pytest.mark.parametrize(("fields", "pattern", "flag", "written"), [
    ({"decoder_sparse_step": 2}, [0, 1, 0, 1, 0, 1], "[0,1]*3", (2, [])),
    ({"decoder_sparse_step": 3}, [0, 0, 1, 0, 0, 1], "[0,0,1]*2", (3, [])),
    ({"mlp_only_layers": [0, 5]}, [0, 1, 1, 1, 1, 0], "[0,1,1,1,1,0]", (1, [0, 5])),
    ({"decoder_sparse_step": 2, "mlp_only_layers": [3]}, [0, 1, 0, 0, 0, 1], "[0,1,0,0,0,1]", (1, [0, 2, 3, 4])),
])
def test_qwen_moe_dense_layers_read_as_transformers_builds_them_and_write_back(fields, pattern, flag, written):
    """Layer i is MoE unless in mlp_only_layers, and only if (i + 1) % decoder_sparse_step == 0 (transformers'
    Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer); mg -> hf writes a step where one gives the pattern."""
    import transformers

    for name in ("qwen2_moe", "qwen3_moe"):
        family = FAMILIES[name]
        config = getattr(transformers, family.config_class)(num_hidden_layers=6, num_experts=4, **fields)
        model = transformers.AutoModelForCausalLM.from_config(
            config.__class__(**{**config.to_dict(), "hidden_size": 8, "intermediate_size": 8, "moe_intermediate_size": 4,
                                "shared_expert_intermediate_size": 4, "num_attention_heads": 2,
                                "num_key_value_heads": 2, "head_dim": 4, "vocab_size": 16}))
        built = [int(hasattr(layer.mlp, "experts")) for layer in model.model.layers]
        args = model_args(family, config.to_dict())
        assert args["moe_layer_freq"] == pattern == built, name
        flags = pretrain_flags(args)
        assert flags[flags.index("--moe-layer-freq") + 1] == flag
        kwargs = hf_config_kwargs(family, args)
        assert (kwargs["decoder_sparse_step"], kwargs["mlp_only_layers"]) == written


def test_moe_layer_patterns_a_family_cannot_hold_are_named():
    with pytest.raises(UnsupportedModelError, match=r"decoder_sparse_step 1 and mlp_only_layers \[0, 1\] leave no "
                                                    r"MoE layer among 2"):
        model_args(FAMILIES["qwen3_moe"], {"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [0, 1],
                                           "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                                           "max_position_embeddings": 8, "vocab_size": 16})
    mixtral = {"num_layers": 2, "num_experts": 4, "moe_ffn_hidden_size": 8, "moe_router_topk": 2,
               "moe_router_pre_softmax": False, "moe_layer_freq": [0, 1], "vocab_size": 16, "hidden_size": 8,
               "ffn_hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 2, "kv_channels": 4,
               "max_position_embeddings": 8, "norm_epsilon": 1e-6, "rotary_base": 10000,
               "untie_embeddings_and_output_weights": True}
    with pytest.raises(UnsupportedModelError, match="Mixtral has an MoE MLP in every layer"):
        hf_config_kwargs(FAMILIES["mixtral"], mixtral)
