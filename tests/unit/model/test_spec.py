"""The layer-spec choice and the megatron-core / transformer-engine API it relies on (engine/model/compat.py).

TE does not import on CPU, so the TE call is checked against the installed megatron-core's signature, and
megatron's real TE spec functions are run with the CPU stand-ins of tests/te_standins.py (TE's class names
and parameter names, local math) in one spawned rank.
"""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from engine.model import compat
from engine.model.spec import resolve_transformer_impl
from tests.distributed.harness import run_ranks

TINY = ("--num-layers 4 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 4 --group-query-attention "
        "--num-query-groups 2 --seq-length 32 --max-position-embeddings 32 --vocab-size 128 --swiglu "
        "--normalization RMSNorm --disable-bias-linear --position-embedding-type rope --micro-batch-size 1").split()


def _config(**kwargs):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             use_cpu_initialization=True, **kwargs)


# -- the megatron-core API, on the installed version -----------------------------------------------------------


def test_installed_megatron_core_has_the_api_the_engine_calls():
    assert compat.api_problems() == []
    low, high = compat.SUPPORTED_MEGATRON_CORE
    assert low <= compat.megatron_core_version() <= high


def test_te_block_spec_call_binds_the_installed_signature(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    real = inspect.signature(gpt_layer_specs.get_gpt_decoder_block_spec)
    calls = []

    def recording(*args, **kwargs):
        calls.append(real.bind(*args, **kwargs).arguments)  # TypeError if the call does not fit
        return "spec"

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_decoder_block_spec", recording)
    config = _config(normalization="RMSNorm", qk_layernorm=True)
    assert compat.te_decoder_block_spec(config, vp_stage=1) == "spec"
    (arguments,) = calls
    assert arguments["config"] is config and arguments["use_transformer_engine"] is True
    assert arguments["normalization"] == "RMSNorm" and arguments["vp_stage"] == 1
    assert "qk_layernorm" not in real.parameters  # read from config.qk_layernorm by megatron itself


def test_api_problems_name_a_signature_that_lacks_a_parameter(monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs

    def old(config, use_transformer_engine, qk_layernorm=False):  # a shape this engine cannot call
        return None

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_decoder_block_spec", old)
    assert compat.api_problems() == ["get_gpt_decoder_block_spec has no parameter normalization, vp_stage"]


def test_te_detection_imports_the_pytorch_extension_and_needs_megatrons_te_layers(monkeypatch):
    import importlib

    from megatron.core.models.gpt import gpt_layer_specs

    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name))
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", False)
    compat.transformer_engine_status.cache_clear()
    try:
        ok, why = compat.transformer_engine_status()
        assert imported == ["transformer_engine.pytorch"]
        assert not ok and "megatron-core could not load its TE layers" in why
        monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
        compat.transformer_engine_status.cache_clear()
        assert compat.transformer_engine_status()[0]
    finally:
        compat.transformer_engine_status.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machines have no transformer-engine")
def test_no_te_here_and_auto_means_local():
    ok, why = compat.transformer_engine_status()
    assert not ok and "transformer_engine.pytorch does not import" in why
    assert resolve_transformer_impl("auto") == "local"
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine, but transformer_engine.pytorch"):
        resolve_transformer_impl("transformer_engine")


# -- the spec choice with TE available (monkeypatched) ---------------------------------------------------------


def test_auto_picks_te_when_available_and_local_under_lora_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(compat, "transformer_engine_available", lambda: True)
    assert resolve_transformer_impl("auto") == "transformer_engine"
    assert resolve_transformer_impl("transformer_engine") == "transformer_engine"
    assert resolve_transformer_impl("local", lora=True) == "local"
    with caplog.at_level(logging.INFO, logger="engine.model.spec"):
        assert resolve_transformer_impl("auto", lora=True) == "local"
    (record,) = caplog.records
    assert "local layer spec, not transformer_engine, because LoRA" in record.getMessage()


def test_explicit_te_with_lora_is_a_clear_error_before_anything_is_built():
    from engine.arguments import ConfigError, build_parser, config_from_args, validate

    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
            "--lora-r 4 --transformer-impl transformer_engine").split()
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine cannot be combined with --lora-r"):
        validate(config_from_args(build_parser().parse_args(argv)), world_size=1)


def test_lora_launch_scripts_take_the_local_spec_on_a_te_machine(monkeypatch):
    """examples/mcore/*/dpo_*_lora_ptd.sh, unchanged, on a machine where TE imports."""
    from engine.arguments import build_parser, config_from_args
    from tests.unit.test_launch_scripts import SCRIPTS, dry_run, entry

    monkeypatch.setattr(compat, "transformer_engine_available", lambda: True)
    scripts = [p for p in SCRIPTS if p.name.startswith("dpo_") and "_lora_" in p.name]
    assert len(scripts) == 10  # seven dense models, three MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B)
    for script in scripts:
        _, flags = entry(dry_run(script), "pretrain_dpo.py")
        config = config_from_args(build_parser().parse_args(flags))
        assert config.lora.enabled and config.model.transformer_impl == "auto", script.name
        assert resolve_transformer_impl(config.model.transformer_impl, lora=config.lora.enabled) == "local"


# -- megatron's TE spec built and instantiated with CPU stand-ins (one spawned rank) ---------------------------


def _te_spec_facts() -> dict:
    from megatron.core.transformer.identity_op import IdentityOp

    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_model_chunks, transformer_config
    from engine.model.spec import decoder_block_spec
    from tests import te_standins

    te_standins.install()
    facts = {}
    for name, extra in (("rms_qk", ["--qk-layernorm"]), ("layernorm", ["--normalization", "LayerNorm"])):
        argv = [a for a in TINY if name != "layernorm" or a not in ("--normalization", "RMSNorm")] + extra
        config = parse_args(argv, world_size=1)
        platform = initialize_distributed(config.parallel)
        set_random_seeds(0)
        impl = resolve_transformer_impl(config.model.transformer_impl)
        spec = decoder_block_spec(transformer_config(config, platform, impl), impl, "auto", None)
        layer = spec.layer_specs[0].submodules
        attention = layer.self_attention.submodules
        facts[name] = {
            "impl": impl, "layers": len(spec.layer_specs), "final_norm": spec.layer_norm.__name__,
            "input_layernorm": layer.input_layernorm is IdentityOp,
            "pre_mlp_layernorm": layer.pre_mlp_layernorm is IdentityOp,
            "linear_qkv": attention.linear_qkv.__name__, "linear_fc1": layer.mlp.submodules.linear_fc1.__name__,
            "q_layernorm": getattr(attention.q_layernorm, "__name__", None),
            "core_attention": attention.core_attention.__name__,
            "te_keys": sorted(build_model_chunks(config, platform)[0].state_dict()),
        }
        local = parse_args(argv + ["--transformer-impl", "local"], world_size=1)
        facts[name]["local_keys"] = sorted(build_model_chunks(local, platform)[0].state_dict())
        lora = parse_args(argv + ["--lora-r", "4", "--lora-alpha", "8"], world_size=1)
        facts[name]["lora_keys"] = sorted(build_model_chunks(lora, platform)[0].state_dict())
    return facts


@pytest.fixture(scope="module")
def te_facts() -> dict:
    return run_ranks(_te_spec_facts, 1)[0]


def test_megatrons_te_spec_fuses_the_norms_and_honours_qk_layernorm(te_facts):
    for name, facts in te_facts.items():
        assert facts["impl"] == "transformer_engine" and facts["layers"] == 4, name
        assert facts["input_layernorm"] and facts["pre_mlp_layernorm"], name  # IdentityOp: fused into the linears
        assert facts["linear_qkv"] == facts["linear_fc1"] == "TELayerNormColumnParallelLinearStandIn", name
        assert facts["core_attention"] == "SDPAttention" and facts["final_norm"] == "Norm", name
    assert te_facts["rms_qk"]["q_layernorm"] == "Norm"  # TENorm, from config.qk_layernorm
    assert te_facts["layernorm"]["q_layernorm"] == "IdentityOp"


def test_te_model_state_dict_is_the_local_one_respelled(te_facts):
    from engine.model.spelling import te_spelling, to_spelling

    for name, facts in te_facts.items():
        local, te = facts["local_keys"], facts["te_keys"]
        assert sorted(to_spelling(dict.fromkeys(local), te=True)) == te, name
        assert sorted(to_spelling(dict.fromkeys(te), te=False)) == local, name
        # megatron's local linears save an _extra_state (None) as TE's do: one name in both
        assert "decoder.layers.0.mlp.linear_fc1._extra_state" in local
        assert te_spelling(te) is True and te_spelling(local) is False
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
        assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in te
        assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te_facts["layernorm"]["te_keys"]
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_bias" not in te_facts["rms_qk"]["te_keys"]
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in te_facts["rms_qk"]["te_keys"]


def test_lora_run_builds_the_local_spec_on_a_te_machine(te_facts):
    for facts in te_facts.values():
        keys = facts["lora_keys"]
        assert "decoder.layers.0.self_attention.linear_qkv.lora_A.weight" in keys
        assert "decoder.layers.0.input_layernorm.weight" in keys  # local spelling: the local spec
