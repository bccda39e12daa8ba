"""LoRA DPO end to end: `torchrun pretrain_dpo.py --lora-r ...` in several layouts, adapter-only
checkpoints and exact resume, merge/export through convert_ckpt.py, and the PEFT adapter in transformers.

Reuses test_dpo.py's assets (tiny HF Llama, learnable preference shards, converted checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.convert.common import ConvertConfig
from engine.convert.run import run_conversion
from tests.distributed.harness import run_ranks
from tests.e2e.test_dpo import assets, read_metrics, run_dpo  # noqa: F401 - `assets` is a fixture

R, ALPHA = 8, 16.0
LORA = f"--lora-r {R} --lora-alpha {ALPHA} --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2"
STEPS = f"--train-iters 4 --micro-batch-size 2 --lr 5e-3 {LORA}"
LAYOUTS = [  # (name, TP, PP, ranks, extra flags); TP2 + sequence parallel is the `tp2_run` fixture
    ("pp2", 1, 2, 2, ""),
    ("dp2", 1, 1, 2, "--use-distributed-optimizer"),
]
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tp1_run(assets, tmp_path_factory):  # noqa: F811
    """The reference LoRA run at TP1: 4 steps, adapter-only checkpoints at 2 and 4."""
    save = tmp_path_factory.mktemp("lora") / "tp1"
    rows = run_dpo(assets, save, extra=f"{STEPS} --save-interval 2 --lora-ckpt-filter")
    return save, rows


@pytest.fixture(scope="module")
def tp2_run(assets, tmp_path_factory):  # noqa: F811
    """The same run at TP2 with sequence parallel, adapter-only checkpoint at the end."""
    save = tmp_path_factory.mktemp("lora") / "tp2sp"
    rows = run_dpo(assets, save, tp=2, nproc=2, extra=f"{STEPS} --sequence-parallel --lora-ckpt-filter")
    return save, rows


def test_step1_is_ln2_and_losses_agree_across_layouts(assets, tp1_run, tp2_run, tmp_path):  # noqa: F811
    _, reference = tp1_run
    losses = [row["loss"] for row in reference]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # fresh adapters: policy == reference
    assert losses[-1] < losses[0] - 0.01  # the adapters learn
    runs = [("tp2sp", tp2_run[1])]
    for name, tp, pp, nproc, extra in LAYOUTS:
        runs.append((name, run_dpo(assets, tmp_path / name, tp, pp, nproc, f"{STEPS} {extra}")))
    for name, rows in runs:
        assert [r["loss"] for r in rows] == pytest.approx(losses, abs=1e-5), name
        assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4), name


def test_only_adapters_are_trained_and_saved(assets, tp1_run):  # noqa: F811
    save, _ = tp1_run
    state = torch.load(save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model = state["model"]
    assert model and all(".lora_A." in k or ".lora_B." in k for k in model)
    assert len(model) == 4 * 4 * 2  # 4 layers x 4 linears x (A, B)
    adapter_numel = sum(t.numel() for t in model.values())
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k == "exp_avg"]
    assert sum(t.numel() for t in moments) == adapter_numel  # the optimizer holds the adapters only
    assert state["args"]["lora_adapter_only"] is True
    base, _ = assets.checkpoint(1, 1)
    assert state["args"]["lora_base"] == str(Path(base).resolve())
    hidden, ffn, heads, groups, head_dim = 64, 128, 4, 2, 16
    qkv = (heads + 2 * groups) * head_dim
    per_layer = R * (hidden + qkv) + R * (heads * head_dim + hidden) + R * (hidden + 2 * ffn) + R * (ffn + hidden)
    assert adapter_numel == 4 * per_layer


def test_lora_load_resumes_exactly(assets, tp1_run, tmp_path):  # noqa: F811
    save, straight = tp1_run
    partial = tmp_path / "at2"
    partial.mkdir()
    shutil.copytree(save / "iter_0000002", partial / "iter_0000002")
    (partial / "latest_checkpointed_iteration.txt").write_text("2")
    rows = run_dpo(assets, tmp_path / "resumed", extra=f"{STEPS} --lora-ckpt-filter --lora-load {partial}")
    assert [r["iteration"] for r in rows] == [3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight[2:]]  # bit-exact on CPU fp32


def _lora_logits(flags: list[str], tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits (gathered over TP, vocab padding cut) of the model the flags load, --lora-load included."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.lora import prepare_adapters
    from engine.model.provider import build_model_chunks
    from engine.training.checkpointing import Checkpointer

    config = parse_args(flags, world_size=int(os.environ["WORLD_SIZE"]))
    platform = initialize_distributed(config.parallel)
    set_random_seeds(config.training.seed)
    chunks = build_model_chunks(config, platform)
    if config.lora.enabled:
        prepare_adapters(chunks, config.training.seed)
    Checkpointer(config).load_policy(chunks)
    with torch.no_grad():
        logits = chunks[0](tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)
        logits = gather_from_tensor_model_parallel_region(logits)[..., : config.model.vocab_size]
    return logits.clone() if parallel_state.get_tensor_model_parallel_rank() == 0 else None


def _hf_logits(folder: Path, tokens: torch.Tensor, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_merge_and_peft_export_reproduce_the_adapter_model(assets, tp2_run, tmp_path):  # noqa: F811
    base, flags = assets.checkpoint(2, 1)
    run, _ = tp2_run  # TP2-sharded adapters: the converter merges their shards
    model_flags = [*flags, "--seq-length", "128"]
    adapter_model = run_ranks(_lora_logits, 2, [*model_flags, "--tensor-model-parallel-size", "2", "--load", str(base),
                                                *LORA.split(), "--lora-load", str(run)], TOKENS)[0]
    plain = run_ranks(_lora_logits, 2, [*model_flags, "--tensor-model-parallel-size", "2", "--load", str(base)],
                      TOKENS)[0]
    assert (adapter_model - plain).abs().max() > 1e-3  # the adapters changed the model

    lora = dict(lora_load=str(run), lora_r=R, lora_alpha=ALPHA)
    merged_mg, merged_hf, peft_dir = tmp_path / "merged_mg", tmp_path / "merged_hf", tmp_path / "peft"
    run_conversion(ConvertConfig("mg", "mg", str(base), str(merged_mg), 1, 1, make_vocab_size_divisible_by=16,
                                 **lora))
    run_conversion(ConvertConfig("mg", "hf", str(base), str(merged_hf), **lora))
    run_conversion(ConvertConfig("mg", "hf", str(base), str(peft_dir), save_lora_to_hf=True, **lora))

    merged = run_ranks(_lora_logits, 1, [*model_flags, "--load", str(merged_mg)], TOKENS)[0]
    torch.testing.assert_close(merged, adapter_model, rtol=0, atol=1e-5)
    hf_merged = _hf_logits(merged_hf, TOKENS)
    torch.testing.assert_close(hf_merged, adapter_model, rtol=0, atol=1e-4)

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R and config["lora_alpha"] == ALPHA
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with_adapter = _hf_logits(assets.hf_policy, TOKENS, adapter=peft_dir)
    torch.testing.assert_close(with_adapter, hf_merged, rtol=0, atol=1e-5)
