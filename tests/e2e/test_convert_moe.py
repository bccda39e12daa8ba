"""HF <-> megatron-core conversion of the MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers.

Tiny random models saved by transformers itself (one tensor per expert projection on disk) are converted,
run by megatron-core at TP1 and EP2 (each EP rank takes its experts from the converted files),
and converted back bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.convert.common import ConversionError, ConvertConfig
from engine.convert.run import run_conversion
from tests.distributed.harness import run_ranks
from tests.e2e.convert_assets import MOE_CONFIGS, build_tiny_moe, converted_logits, hf_logits

# (name, world, TP, EP of the converted files, extra flags). TP2 x EP2 and PP2 x EP2 run the same kind of
# weights in tests/distributed/test_moe.py; an EP run from EP1 files in tests/e2e/test_moe_dpo.py.
LAYOUTS = [("tp1", 1, 1, 1, []), ("ep2", 2, 1, 2, [])]
TOKENS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {family: build_tiny_moe(family, root / family, seed=i) for i, family in enumerate(MOE_CONFIGS)}


def test_moe_logits_match_transformers(moe_models, tmp_path):
    expected = {family: hf_logits(path, TOKENS) for family, path in moe_models.items()}
    for name, world, tp, ep, extra in LAYOUTS:
        runs = []
        for family, path in moe_models.items():
            out = tmp_path / f"{family}_{name}"
            flags = run_conversion(ConvertConfig("hf", "mg", str(path), str(out), tp, 1,
                                                 target_expert_parallel_size=ep))
            runs.append((flags + ["--seq-length", "16"] + extra, str(out)))
        # Every data-parallel replica (the EP ranks run the same tokens) reports; all must match.
        outputs = [o for o in run_ranks(converted_logits, world, runs, TOKENS) if o is not None]
        assert len(outputs) == world // tp, name
        for output in outputs:
            for family, logits in zip(moe_models, output):
                diff = (logits - expected[family]).abs().max().item()
                assert diff <= 1e-4, f"{family} {name}: max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("family", list(MOE_CONFIGS))
def test_moe_round_trip_is_bit_exact(family, moe_models, tmp_path):
    # hf -> mg TP2 x PP2 x EP2 -> mg EP1 -> mg EP4 (PP1: mp_rank_TT_EEE names) -> hf
    mg, ep1, ep4, back = tmp_path / "mg", tmp_path / "ep1", tmp_path / "ep4", tmp_path / "hf"
    run_conversion(ConvertConfig("hf", "mg", str(moe_models[family]), str(mg), 2, 2, target_expert_parallel_size=2))
    assert (mg / "iter_0000001" / "mp_rank_01_001_001" / "model_optim_rng.pt").is_file()
    run_conversion(ConvertConfig("mg", "mg", str(mg), str(ep1), 1, 1))
    flags = run_conversion(ConvertConfig("mg", "mg", str(ep1), str(ep4), 1, 1, target_expert_parallel_size=4))
    assert flags[flags.index("--expert-model-parallel-size") + 1] == "4"
    ep3 = torch.load(ep4 / "iter_0000001" / "mp_rank_00_003" / "model_optim_rng.pt", weights_only=False)["model"]
    assert sorted(k for k in ep3 if k.startswith("decoder.layers.0.mlp.experts")) == [
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]  # expert 3, renumbered
    run_conversion(ConvertConfig("mg", "hf", str(ep4), str(back)))
    source, result = load_file(moe_models[family] / "model.safetensors"), load_file(back / "model.safetensors")
    assert source.keys() == result.keys()  # transformers' own on-disk names, one tensor per expert projection
    assert all(torch.equal(source[k], result[k]) for k in source)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(back).model_type == AutoConfig.from_pretrained(moe_models[family]).model_type


# Dense MLP layers between MoE layers (--moe-layer-freq): transformers' decoder_sparse_step and mlp_only_layers.
# qwen2_moe's pattern repeats every two layers; qwen3_moe's does not, so at PP2 the second stage ([1, 1]) differs
# from the first ([0, 1]) and a stage that read the pattern from its own first layer would build the wrong layers.
DENSE_LAYERS = {"qwen2_moe": (dict(decoder_sparse_step=2), "[0,1]*2"),
                "qwen3_moe": (dict(mlp_only_layers=[0]), "[0,1,1,1]")}


@pytest.fixture(scope="module")
def dense_layer_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe_dense_layers")
    return {family: build_tiny_moe(family, root / family, seed=5 + i, num_hidden_layers=4, **fields)
            for i, (family, (fields, _)) in enumerate(DENSE_LAYERS.items())}


def test_moe_dense_layers_convert_match_transformers_across_pipeline_stages(dense_layer_models, tmp_path):
    runs = []
    for family, path in dense_layer_models.items():
        out = tmp_path / family
        flags = run_conversion(ConvertConfig("hf", "mg", str(path), str(out), 1, 2))
        assert flags[flags.index("--moe-layer-freq") + 1] == DENSE_LAYERS[family][1]
        stage0 = torch.load(out / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
        # the qwen2_moe dense layer is an MLP of intermediate_size, not of moe_intermediate_size
        assert stage0["model"]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 64, 32)
        runs.append((flags + ["--seq-length", "16"], str(out)))
    (output,) = [o for o in run_ranks(converted_logits, 2, runs, TOKENS) if o is not None]
    for family, logits in zip(dense_layer_models, output):
        diff = (logits - hf_logits(dense_layer_models[family], TOKENS)).abs().max().item()
        assert diff <= 1e-4, f"{family}: max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("family", list(DENSE_LAYERS))
def test_moe_dense_layers_round_trip_is_bit_exact(family, dense_layer_models, tmp_path):
    """hf -> mg (PP2) -> hf: the same tensors, and the config's decoder_sparse_step / mlp_only_layers back."""
    import json

    source_dir, mg, back = dense_layer_models[family], tmp_path / "mg", tmp_path / "hf"
    run_conversion(ConvertConfig("hf", "mg", str(source_dir), str(mg), 1, 2))
    run_conversion(ConvertConfig("mg", "hf", str(mg), str(back)))
    source, result = load_file(source_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert source.keys() == result.keys() and "model.layers.0.mlp.down_proj.weight" in result
    assert all(torch.equal(source[k], result[k]) for k in source)
    config, original = (json.loads((d / "config.json").read_text()) for d in (back, source_dir))
    for field in ("decoder_sparse_step", "mlp_only_layers"):
        assert config[field] == original[field], field


def test_moe_whole_experts_under_tp2_convert_and_match_transformers(moe_models, tmp_path):
    """--target-expert-tensor-parallel-size 1 at TP2 x EP2: Megatron-LM's two files (the training ranks'
    (TP rank, EP rank) pairs), each expert whole; megatron-core at TP2 x EP2 x ETP1 reproduces transformers'
    logits; resharding to ETP2 (four files) and to EP1 x ETP1, then back to HF, is bit-exact."""
    family = "qwen2_moe"  # the shared expert still splits over TP
    mg, etp2, ep1, back = (tmp_path / name for name in ("mg", "etp2", "ep1", "hf"))
    with pytest.raises(ConversionError, match=r"--target-expert-tensor-parallel-size \(2\) must divide "
                                              r"--target-tensor-parallel-size \(1\)"):
        run_conversion(ConvertConfig("hf", "mg", str(moe_models[family]), str(mg), 1, 1,
                                     target_expert_parallel_size=2, target_expert_tensor_parallel_size=2))
    flags = run_conversion(ConvertConfig("hf", "mg", str(moe_models[family]), str(mg), 2, 1,
                                         target_expert_parallel_size=2, target_expert_tensor_parallel_size=1))
    assert flags[flags.index("--expert-tensor-parallel-size") + 1] == "1"
    assert sorted(p.name for p in (mg / "iter_0000001").iterdir() if p.is_dir()) == ["mp_rank_00_000",
                                                                                      "mp_rank_01_001"]
    outputs = [o for o in run_ranks(converted_logits, 4, [(flags + ["--seq-length", "16", "--sequence-parallel"],
                                                           str(mg))], TOKENS) if o is not None]
    assert len(outputs) == 2
    expected = hf_logits(moe_models[family], TOKENS)
    for (logits,) in outputs:
        assert (logits - expected).abs().max().item() <= 1e-4
    run_conversion(ConvertConfig("mg", "mg", str(mg), str(etp2), 2, 1, target_expert_parallel_size=2))
    assert len([p for p in (etp2 / "iter_0000001").iterdir() if p.is_dir()]) == 4
    run_conversion(ConvertConfig("mg", "mg", str(etp2), str(ep1), 2, 1, target_expert_tensor_parallel_size=1))
    run_conversion(ConvertConfig("mg", "hf", str(ep1), str(back)))
    source, result = load_file(moe_models[family] / "model.safetensors"), load_file(back / "model.safetensors")
    assert source.keys() == result.keys()
    assert all(torch.equal(source[k], result[k]) for k in source)
