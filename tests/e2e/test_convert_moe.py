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

from engine.convert.common import ConvertConfig
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
