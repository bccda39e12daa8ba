"""HF <-> megatron-core conversion, end to end, against transformers as ground truth.

Tiny random HF models of each family are converted to every layout and run by
megatron-core on gloo ranks (one spawn per layout, all families inside), then
converted back (bit-exact), loaded by transformers, and compared on greedy generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.arguments import parse_args
from engine.convert.common import ConvertConfig
from engine.convert.run import run_conversion
from tests.assets import build_family_tokenizer_dir
from tests.distributed.harness import run_ranks
from tests.e2e.convert_assets import (
    FAMILY_CONFIGS,
    PARITY_FAMILIES,
    build_tiny_hf_model,
    converted_logits,
    hf_greedy,
    hf_logits,
)

LAYOUTS = [  # (name, world size, TP, PP)
    ("tp1", 1, 1, 1),
    ("tp2", 2, 2, 1),
    ("pp2", 2, 1, 2),
    ("tp2pp2", 4, 2, 2),
]
TOKENS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: build_tiny_hf_model(family, root / family, seed=i) for i, family in enumerate(FAMILY_CONFIGS)}


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_hf_to_mg_logits_match_transformers(hf_models, tmp_path):
    expected = {family: hf_logits(hf_models[family], TOKENS) for family in PARITY_FAMILIES}
    for name, world, tp, pp in LAYOUTS:
        runs = []
        for family in PARITY_FAMILIES:
            out = tmp_path / f"{family}_{name}"
            flags = run_conversion(ConvertConfig("hf", "mg", str(hf_models[family]), str(out), tp, pp))
            # The printed flags are what pretrain_dpo.py gets; the test adds only run-specific ones.
            runs.append((flags + ["--seq-length", "16"], str(out)))
        outputs = [o for o in run_ranks(converted_logits, world, runs, TOKENS) if o is not None]
        assert len(outputs) == 1, name
        for family, logits in zip(PARITY_FAMILIES, outputs[0]):
            diff = (logits - expected[family]).abs().max().item()
            assert diff <= 1e-4, f"{family} {name}: max abs logit diff {diff:.2e}"
            assert torch.equal(logits.argmax(-1), expected[family].argmax(-1)), f"{family} {name}: argmax"


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_round_trip_is_bit_exact_and_generates_the_same(family, hf_models, tmp_path):
    source = tmp_path / "source"
    source.symlink_to(hf_models[family], target_is_directory=True)
    tokenizer = build_family_tokenizer_dir(tmp_path / "tokenizer", "qwen" if family.startswith("qwen") else "llama3")
    mg, resharded, back = tmp_path / "mg", tmp_path / "mg_tp1pp4", tmp_path / "hf_out"
    # Uneven PP and TP2, then a reshard to PP4, then back to HF with small shards (index + several files).
    run_conversion(ConvertConfig("hf", "mg", str(source), str(mg), 2, 2, num_layer_list=(1, 3),
                                 tokenizer_model=tokenizer))
    run_conversion(ConvertConfig("mg", "mg", str(mg), str(resharded), 1, 4))
    run_conversion(ConvertConfig("mg", "hf", str(resharded), str(back), max_shard_size=40_000))

    original, converted = _all_tensors(hf_models[family]), _all_tensors(back)
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    assert (back / "model.safetensors.index.json").is_file()
    assert json.loads((back / "config.json").read_text())["model_type"] == json.loads(
        (hf_models[family] / "config.json").read_text())["model_type"]
    assert (back / "generation_config.json").is_file() and (back / "tokenizer_config.json").is_file()

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(back)("hello world")["input_ids"]
    prompt = TOKENS[:1, :6]
    assert torch.equal(hf_greedy(back, prompt), hf_greedy(hf_models[family], prompt))


def test_printed_flags_describe_the_checkpoint(hf_models, tmp_path):
    out = tmp_path / "mg"
    flags = run_conversion(ConvertConfig("hf", "mg", str(hf_models["qwen3"]), str(out), 2, 1,
                                         params_dtype="bf16"))
    config = parse_args(flags + ["--seq-length", "32", "--micro-batch-size", "2"], world_size=2)
    assert config.precision.bf16 and config.parallel.tensor_model_parallel_size == 2
    assert config.model.kv_channels == 32 and config.model.qk_layernorm
    state = torch.load(out / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    args = state["args"]
    assert state["iteration"] == 1 and state["checkpoint_version"] == 3.0
    assert args["family"] == "qwen3" and args["vocab_size"] == 200 and args["params_dtype"] == "bf16"
    assert state["model"]["embedding.word_embeddings.weight"].shape == (config.padded_vocab_size // 2, 64)
    assert state["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"


def _rank_model(root: Path, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(root / "iter_0000001" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt",
                      weights_only=False)["model"]


def test_te_spelled_checkpoints_convert_both_ways_and_match_transformers(hf_models, tmp_path):
    """--transformer-impl transformer_engine writes the TE spec's names; every direction reads either.

    The TE-named checkpoint runs in megatron's real TE spec (with CPU stand-ins for TE's layers, carrying
    TE's parameter names) and in the local spec (renamed as training's --load does), both against transformers.
    """
    from engine.model.spelling import te_spelling, to_spelling

    family = "qwen3"  # q/k norms and head_dim != hidden / heads
    source = hf_models[family]
    te, local = tmp_path / "mg_te", tmp_path / "mg_local"
    flags = run_conversion(ConvertConfig("hf", "mg", str(source), str(te), transformer_impl="transformer_engine"))
    run_conversion(ConvertConfig("hf", "mg", str(source), str(local)))
    te_state, local_state = _rank_model(te), _rank_model(local)
    assert te_spelling(te_state) is True and te_spelling(local_state) is False
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te_state
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in te_state
    renamed = to_spelling(local_state, te=True)
    assert renamed.keys() == te_state.keys() and all(torch.equal(renamed[k], te_state[k]) for k in te_state)

    expected = hf_logits(source, TOKENS)
    runs = [(flags + ["--seq-length", "16", "--transformer-impl", "transformer_engine"], str(te)),
            (flags + ["--seq-length", "16", "--transformer-impl", "local"], str(te))]
    for name, logits in zip(("TE spec", "local spec"), run_ranks(converted_logits, 1, runs, TOKENS, True)[0]):
        diff = (logits - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs logit diff {diff:.2e}"

    # mg -> mg keeps the source's names (TP2: the fused norms are replicated), or takes the asked ones; -> hf exact.
    te_tp2, local_tp2, back = tmp_path / "mg_te_tp2", tmp_path / "mg_local_tp2", tmp_path / "hf_back"
    run_conversion(ConvertConfig("mg", "mg", str(te), str(te_tp2), 2, 1))
    run_conversion(ConvertConfig("mg", "mg", str(te), str(local_tp2), 2, 1, transformer_impl="local"))
    shards = [_rank_model(te_tp2, r) for r in (0, 1)]
    assert all(te_spelling(shard) is True for shard in shards) and te_spelling(_rank_model(local_tp2, 1)) is False
    norm = "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    assert torch.equal(shards[0][norm], te_state[norm]) and torch.equal(shards[1][norm], te_state[norm])
    run_conversion(ConvertConfig("mg", "hf", str(te_tp2), str(back)))
    original, converted = _all_tensors(source), _all_tensors(back)
    assert original.keys() == converted.keys()
    assert all(torch.equal(converted[k], v) for k, v in original.items())
