"""DPO on one CUDA GPU: the CPU suite's guarantees, checked where users run the engine.

Every run is `torchrun pretrain_dpo.py` on the tiny assets of tests/e2e (Llama, 4 layers, hidden 64), one
rank, fp32 unless said. The baseline uses the local spec with megatron's unfused attention and a fixed
cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG), so two runs over the same batches are bit-identical; the
`auto` run takes transformer-engine's spec when TE imports. Skipped without CUDA (tests/cuda/conftest.py).
Not yet run on a GPU: README "GPU" says what was.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_ranks, run_torchrun
from tests.e2e.test_dpo import SEQ, TRAIN, Assets, read_metrics

STEPS = "--train-iters 5 --micro-batch-size 2"
LOCAL = "--transformer-impl local --attention-backend unfused"
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("gpu"))


def run(assets: Assets, save: Path, extra: str, env: dict | None = None, load: Path | None = None) -> list[dict]:
    checkpoint, flags = assets.checkpoint(1, 1)
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--load", str(load or checkpoint),
            "--save", str(save), *extra.split()]
    result = run_torchrun("pretrain_dpo.py", args, nproc=1, timeout=300, env={**DETERMINISTIC, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    device = "cpu (gloo)" if env == CPU_ONLY else "cuda (nccl)"
    assert f"on {device}" in result.stderr, result.stderr[-3000:]
    return read_metrics(save)


def losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory) -> list[dict]:
    rows = run(assets, tmp_path_factory.mktemp("base"), f"{STEPS} {LOCAL}")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    return rows


def test_step1_is_ln2_with_the_default_spec(assets, base, tmp_path):
    """--transformer-impl auto: TE's spec where TE imports, loading the converter's (local) weight names."""
    rows = run(assets, tmp_path, STEPS)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # fp32: TE's GEMMs and fused norms against the local ones, same math up to summation order
    assert losses(rows) == pytest.approx(losses(base), abs=1e-3)


def test_cuda_losses_equal_cpu_losses_in_fp32(assets, base, tmp_path):
    cpu = run(assets, tmp_path, f"{STEPS} {LOCAL}", env=CPU_ONLY)
    assert losses(base) == pytest.approx(losses(cpu), abs=1e-4)
    assert [r["rewards/margins"] for r in base] == pytest.approx([r["rewards/margins"] for r in cpu], abs=1e-4)


def test_packed_sequences_give_the_padded_losses(assets, base, tmp_path):
    packed = run(assets, tmp_path, f"{STEPS} --transformer-impl local --attention-backend sdpa --pack-sequences")
    # other attention kernels (SDPA per packed sequence vs unfused with a padding mask): fp32 reduction order
    assert losses(packed) == pytest.approx(losses(base), abs=1e-4)


def test_precomputed_reference_gives_the_online_losses(assets, base, tmp_path):
    cached = run(assets, tmp_path, f"{STEPS} {LOCAL} --precompute-ref-logps")
    assert cached[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(cached) == pytest.approx(losses(base), abs=1e-5)


def test_bf16_tracks_fp32(assets, base, tmp_path):
    bf16 = run(assets, tmp_path, f"{STEPS} {LOCAL} --bf16")
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # same bf16 forward for policy and reference
    assert losses(bf16) == pytest.approx(losses(base), abs=0.05)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_lora_trains_with_the_default_spec(assets, tmp_path):
    rows = run(assets, tmp_path, f"{STEPS} --lora-r 8 --lora-alpha 16")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_is_bit_exact_under_deterministic_mode(assets, tmp_path):
    checkpoint, _ = assets.checkpoint(1, 1)
    flags = f"{LOCAL} --deterministic-mode"
    straight = run(assets, tmp_path / "straight", f"{STEPS} {flags}")
    resumed = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed)
    run(assets, resumed, f"{STEPS.replace('5', '3', 1)} {flags}", load=resumed)
    run(assets, resumed, f"{STEPS} {flags}", load=resumed)
    rows = read_metrics(resumed)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert losses(rows) == losses(straight)


# -- transformer-engine's spec against the local one (skipped without TE) -------------------------------------


def _spec_logits(flags: list[str], root: str, tokens: torch.Tensor) -> dict:
    """Logits of the converted checkpoint under (spec, dtype): local fp32, local bf16, TE bf16."""
    from engine.arguments import parse_args
    from engine.checkpoint.layout import load_rank_state
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_frozen_model, unwrap_model
    from engine.model.spelling import match_spelling
    from engine.platform import current_device

    out = {}
    for impl, precision in (("local", []), ("local", ["--bf16"]), ("transformer_engine", ["--bf16"])):
        config = parse_args(flags + ["--transformer-impl", impl, *precision], world_size=1)
        platform = initialize_distributed(config.parallel)
        set_random_seeds(1234)
        (chunk,) = build_frozen_model(config, platform)
        model = unwrap_model(chunk)
        state = match_spelling(load_rank_state(root, 1, 0, 0, 1)["model"], model.state_dict())
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
        ids = tokens.to(current_device())
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        with torch.no_grad():
            logits = chunk(ids, positions, None)
        out[impl, bool(precision)] = logits.float().cpu()[..., : config.model.vocab_size]
    return out


def test_te_spec_logits_match_the_local_spec_in_bf16(assets):
    from engine.model import compat
    from tests.e2e.convert_assets import hf_logits

    if not compat.transformer_engine_available():
        pytest.skip(f"no transformer-engine: {compat.transformer_engine_status()[1]}")
    checkpoint, flags = assets.checkpoint(1, 1)
    tokens = torch.randint(0, assets.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    logits = run_ranks(_spec_logits, 1, flags + SEQ, str(checkpoint), tokens)[0]
    truth = hf_logits(assets.hf_policy, tokens)  # transformers, fp32, CPU
    local_fp32 = (logits["local", False] - truth).abs().max().item()
    local_bf16 = (logits["local", True] - truth).abs().max().item()
    te_bf16 = (logits["transformer_engine", True] - truth).abs().max().item()
    assert local_fp32 <= 1e-4  # the GPU reproduces transformers in fp32
    # bf16 keeps 8 significant bits (relative rounding 2^-9); every layer rounds its GEMM outputs and
    # activations, and TE rounds at other points than the local spec (its fused norm casts once, inside
    # the GEMM). So TE is held to the error bf16 itself causes in the local spec: at most twice it, plus
    # 2^-9 of the logits' scale for a different rounding of the last GEMM.
    scale = truth.abs().max().item()
    assert te_bf16 <= 2 * local_bf16 + scale * 2**-9, (te_bf16, local_bf16, scale)
    agree = (logits["transformer_engine", True].argmax(-1) == truth.argmax(-1)).float().mean().item()
    assert agree >= 0.95
