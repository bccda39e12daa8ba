"""DPO end to end through `torchrun pretrain_dpo.py`: layouts, batch splits, reference, resume, bad input.

Assets (tokenizer, shards, tiny HF Llama, converted checkpoints) are built once per module, offline.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_cli, run_torchrun
from tests.e2e.dpo_assets import build_preference_data, build_tiny_llama, convert

SEQ = ["--seq-length", "128"]
TRAIN = ("--stage dpo --is-pairwise-dataset --split 100,0,0 --dpo-beta 0.1 --lr 1e-3 --lr-decay-style constant "
         "--clip-grad 1.0 --log-interval 1 --global-batch-size 8").split()


class Assets:
    def __init__(self, root: Path):
        from engine.tokenizer import TokenizerConfig, build_tokenizer

        self.root = root
        self.tokenizer_dir, self.data_prefix = build_preference_data(root, pairs=48)
        self.vocab_size = build_tokenizer(TokenizerConfig("PretrainedFromHF", self.tokenizer_dir)).vocab_size
        self.hf_policy = build_tiny_llama(root / "hf_policy", self.vocab_size, seed=0)
        self._converted: dict[tuple, tuple[Path, list[str]]] = {}

    def checkpoint(self, tp: int, pp: int, hf: Path | None = None,
                   num_layer_list: tuple[int, ...] | None = None) -> tuple[Path, list[str]]:
        hf = hf or self.hf_policy
        key = (hf, tp, pp, num_layer_list)
        if key not in self._converted:
            split = "_" + "-".join(map(str, num_layer_list)) if num_layer_list else ""
            target = self.root / f"mg_{hf.name}_tp{tp}pp{pp}{split}"
            flags = convert(hf, target, tp, pp, num_layer_list)
            self._converted[key] = (target, _model_flags(flags))
        return self._converted[key]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("dpo"))


def _model_flags(flags: list[str]) -> list[str]:
    """The converter's flags minus its layout flags (each run names its own layout)."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layer-list"):
            skip = True
            continue
        out.append(flag)
    return out


def run_dpo(assets: Assets, save: Path, tp: int = 1, pp: int = 1, nproc: int = 1, extra: str = "",
            load: Path | None = None) -> list[dict]:
    checkpoint, flags = assets.checkpoint(tp, pp)
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix,
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--load", str(load or checkpoint), "--save", str(save), *extra.split()]
    result = run_cli("pretrain_dpo", args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_metrics(save)


def read_metrics(save: Path, split: str = "train") -> list[dict]:
    lines = (save / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


LAYOUTS = [
    Layout("tp2", 2, tp=2),
    Layout("pp2", 2, pp=2),
    Layout("dp2", 2),
    Layout("pp2vpp2", 2, "--num-layers-per-virtual-pipeline-stage 1", pp=2),
    # packed rows vary in length, so each send is preceded by its shape, in both directions to one peer
    Layout("pp2vpp2_packed", 2, "--num-layers-per-virtual-pipeline-stage 1 --pack-sequences", pp=2),
    Layout("tp2pp2dp2", 8, "--use-distributed-optimizer", tp=2, pp=2),
    Layout("recompute", 1, "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"),
]


@pytest.fixture(scope="module")
def tp1_rows(assets, tmp_path_factory):
    rows = run_dpo(assets, tmp_path_factory.mktemp("tp1"), extra="--train-iters 5 --micro-batch-size 1")
    losses = [row["loss"] for row in rows]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]
    return rows


@layout_cases(LAYOUTS)
def test_step1_is_ln2_and_losses_agree_across_layouts(layout, assets, tp1_rows, tmp_path):
    rows = run_dpo(assets, tmp_path, layout.tp, layout.pp, layout.ranks,
                   f"--train-iters 5 --micro-batch-size 1 {layout.flags}")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in tp1_rows], abs=1e-5)
    assert [r["rewards/margins"] for r in rows] == pytest.approx([r["rewards/margins"] for r in tp1_rows], abs=1e-5)


def test_micro_batch_split_does_not_change_loss_or_update(assets, tp1_rows, tmp_path):
    one = run_dpo(assets, tmp_path / "1x8", extra="--train-iters 3 --micro-batch-size 8")
    for a, b in zip(one, tp1_rows[:3], strict=True):  # tp1_rows: 8 micro-batches of 1
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """Ten steps at TP1, the baseline of the resume, packing, pipeline-split, cache and bf16 tests."""
    return run_dpo(assets, tmp_path_factory.mktemp("straight"), extra="--train-iters 10 --micro-batch-size 4")


def test_the_torchrun_launcher_trains_like_the_harness(assets, straight, tmp_path):
    """The other tests fork ranks from a preloaded server; this one launches `torchrun` as users do."""
    checkpoint, flags = assets.checkpoint(1, 1)
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--load", str(checkpoint),
            "--save", str(tmp_path), "--train-iters", "2", "--micro-batch-size", "4"]
    result = run_torchrun("pretrain_dpo.py", args, nproc=2)
    assert result.returncode == 0, result.stderr[-6000:]
    assert [r["loss"] for r in read_metrics(tmp_path)] == pytest.approx([r["loss"] for r in straight[:2]], abs=1e-5)


def _hf_sequence_logps(hf_dir: Path, ids: list, labels: list) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total = []
    with torch.no_grad():
        for seq, lab in zip(ids, labels):
            logits = model(torch.tensor(seq).unsqueeze(0)).logits[0, :-1].double()
            target = torch.tensor(lab[1:])
            mask = target != -100
            logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total.append((logp * mask).sum().item())
    return torch.tensor(total, dtype=torch.float64)


def test_step1_with_a_different_reference_matches_transformers(assets, tmp_path):
    from engine.data.dataset import PairwiseDataset

    hf_ref = build_tiny_llama(assets.root / "hf_ref", assets.vocab_size, seed=1)
    ref_checkpoint, _ = assets.checkpoint(1, 1, hf=hf_ref)
    # One global batch holding every pair: the batch means are then independent of the sampling order.
    rows = run_dpo(assets, tmp_path / "ref", extra=f"--train-iters 1 --micro-batch-size 8 --global-batch-size 48 "
                                                   f"--ref-model {ref_checkpoint}")
    data = PairwiseDataset(assets.data_prefix, 128, assets.vocab_size)
    pairs = [data[i] for i in range(len(data))]
    logps = {}
    for name, hf in (("policy", assets.hf_policy), ("reference", hf_ref)):
        for side in ("chosen", "rejected"):
            logps[name, side] = _hf_sequence_logps(
                hf, [p[f"{side}_input_ids"].tolist() for p in pairs], [p[f"{side}_labels"].tolist() for p in pairs])
    chosen = 0.1 * (logps["policy", "chosen"] - logps["reference", "chosen"])
    rejected = 0.1 * (logps["policy", "rejected"] - logps["reference", "rejected"])
    loss = -torch.nn.functional.logsigmoid(chosen - rejected)
    step = rows[0]
    assert abs(loss.mean().item() - math.log(2)) > 1e-3  # the reference really differs
    assert step["loss"] == pytest.approx(loss.mean().item(), abs=1e-5)
    assert step["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert step["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert step["rewards/accuracies"] == pytest.approx((chosen > rejected).double().mean().item(), abs=1e-9)
    assert step["logps/chosen"] == pytest.approx(logps["policy", "chosen"].mean().item(), rel=1e-5)


def test_resume_continues_exactly_and_keeps_the_initial_reference(assets, straight, tmp_path):
    import shutil

    checkpoint, _ = assets.checkpoint(1, 1)
    # MindSpeed-LLM flow: train in a copy of the converted directory, then resume from it.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir)
    first = run_dpo(assets, resumed_dir, load=resumed_dir, extra="--train-iters 5 --micro-batch-size 4")
    assert (resumed_dir / "latest_checkpointed_iteration.txt").read_text() == "5"
    run_dpo(assets, resumed_dir, load=resumed_dir, extra="--train-iters 10 --micro-batch-size 4")
    rows = read_metrics(resumed_dir)
    assert [r["iteration"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]  # bit-exact on CPU fp32
    assert [r["loss"] for r in first] == [r["loss"] for r in straight[:5]]
    saved = torch.load(resumed_dir / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert saved["reference"]["iteration"] == 1
    # --finetune takes the weights only: iteration 1 again, the loaded (trained) policy as its own reference.
    finetuned = run_dpo(assets, tmp_path / "finetuned", load=resumed_dir,
                        extra="--train-iters 1 --micro-batch-size 4 --finetune")
    assert [r["iteration"] for r in finetuned] == [1] and finetuned[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert finetuned[0]["logps/chosen"] != pytest.approx(straight[0]["logps/chosen"], abs=1e-3)  # the trained weights
    # The task is learnable: the loss falls and the policy prefers the chosen answers.
    assert straight[-1]["loss"] < 0.5 * straight[0]["loss"]
    assert straight[-1]["rewards/accuracies"] >= 0.9
    # The trained checkpoint converts back to a transformers model that prefers the chosen answers more.
    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion
    from engine.data.dataset import PairwiseDataset

    hf_out = tmp_path / "hf_trained"
    run_conversion(ConvertConfig(load_model_type="mg", save_model_type="hf", load_dir=str(resumed_dir),
                                 save_dir=str(hf_out)))
    pairs = [PairwiseDataset(assets.data_prefix, 128)[i] for i in range(4)]

    def margin(hf_dir):
        chosen, rejected = (_hf_sequence_logps(hf_dir, [p[f"{s}_input_ids"].tolist() for p in pairs],
                                               [p[f"{s}_labels"].tolist() for p in pairs]) for s in ("chosen", "rejected"))
        return (chosen - rejected).mean().item()

    assert margin(hf_out) > margin(assets.hf_policy) + 1.0


def test_token_budget_micro_batches_train_like_fixed_ones_and_resume_exactly(assets, straight, tmp_path):
    """--max-tokens-per-micro-batch regroups each global batch's pairs (the same 8, in order): the losses and
    updates of --micro-batch-size 4, and a resume continues bit for bit."""
    import shutil

    budget = "--max-tokens-per-micro-batch 256"  # 2 x --seq-length: two to three of these pairs per micro-batch
    whole = run_dpo(assets, tmp_path / "whole", extra=f"--train-iters 4 {budget}")
    for a, b in zip(whole, straight[:4], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    packed = run_dpo(assets, tmp_path / "packed", nproc=2, extra=f"--train-iters 2 --pack-sequences {budget}")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in straight[:2]], abs=1e-6)
    # the interleaved pipeline: 384 tokens pack 3 + 3 + 2 pairs, halved to 4 micro-batches (a multiple of PP)
    interleaved = run_dpo(assets, tmp_path / "vpp", pp=2, nproc=2,
                          extra="--train-iters 2 --pack-sequences --num-layers-per-virtual-pipeline-stage 1 "
                                "--max-tokens-per-micro-batch 384")
    assert [r["loss"] for r in interleaved] == pytest.approx([r["loss"] for r in straight[:2]], abs=1e-5)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(assets.checkpoint(1, 1)[0], resumed_dir)
    run_dpo(assets, resumed_dir, load=resumed_dir, extra=f"--train-iters 2 {budget}")
    run_dpo(assets, resumed_dir, load=resumed_dir, extra=f"--train-iters 4 {budget}")
    assert [r["loss"] for r in read_metrics(resumed_dir)] == [r["loss"] for r in whole]  # bit-exact on CPU fp32


def test_shared_prompt_trains_like_separate_sequences(assets, straight, tmp_path):
    """--shared-prompt (each pair one [prompt | chosen | rejected] sequence) through the CLI: padded at TP1, packed
    with a cached reference and a token budget at TP2 + sequence parallel, and padded and packed on the interleaved
    pipeline (PP2 x VPP2, a layer per virtual stage): the losses and updates of separate padded sequences."""
    vpp = "--train-iters 3 --shared-prompt --num-layers-per-virtual-pipeline-stage 1 --micro-batch-size 2"
    runs = {
        "padded": run_dpo(assets, tmp_path / "padded", extra="--train-iters 3 --micro-batch-size 4 --shared-prompt"),
        "packed_tp2sp": run_dpo(assets, tmp_path / "packed", tp=2, nproc=2,
                                extra="--train-iters 3 --shared-prompt --pack-sequences --precompute-ref-logps "
                                      "--max-tokens-per-micro-batch 256 --sequence-parallel"),
        "pp2vpp2_padded": run_dpo(assets, tmp_path / "vpp_padded", pp=2, nproc=2, extra=vpp),
        "pp2vpp2_packed": run_dpo(assets, tmp_path / "vpp_packed", pp=2, nproc=2, extra=f"{vpp} --pack-sequences"),
    }
    for name, rows in runs.items():
        for a, b in zip(rows, straight[:3], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), name


def test_distributed_optimizer_resumes_exactly(assets, tmp_path):
    """DP2 with the distributed optimizer (torch's Adam, as without TE/apex): its sharded states and Adam's
    step survive a resume, so a cosine run stopped at step 2 continues bit for bit."""
    import shutil

    flags = "--micro-batch-size 2 --use-distributed-optimizer --lr-decay-style cosine --lr-decay-iters 4"
    straight = run_dpo(assets, tmp_path / "straight", nproc=2, extra=f"--train-iters 4 {flags}")
    resumed = tmp_path / "resumed"
    shutil.copytree(assets.checkpoint(1, 1)[0], resumed)
    run_dpo(assets, resumed, nproc=2, load=resumed, extra=f"--train-iters 2 {flags}")
    rows = run_dpo(assets, resumed, nproc=2, load=resumed, extra=f"--train-iters 4 {flags}")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in rows] == [(r["loss"], r["grad_norm"]) for r in straight]


def _pretrain(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("pretrain_dpo", args, nproc=1, timeout=300, env=env)


def test_bad_input_fails_before_training_with_a_clear_error(assets, tmp_path):
    import shutil

    checkpoint, flags = assets.checkpoint(1, 1)
    base = [*flags, *SEQ, *TRAIN, "--train-iters", "1", "--load", str(checkpoint)]

    no_data = _pretrain([*base, "--data-path", str(tmp_path / "nothing")])
    assert no_data.returncode == 2 and "_packed_" in no_data.stderr

    broken = tmp_path / "broken"
    shutil.copytree(Path(assets.data_prefix).parent, broken)
    victim = next(broken.glob("*_packed_rejected_labels_document.idx"))
    victim.unlink()
    missing = _pretrain([*base, "--data-path", str(broken / "pairs")])
    assert missing.returncode == 2 and victim.name in missing.stderr

    layout = _pretrain([*base, "--data-path", assets.data_prefix, "--tensor-model-parallel-size", "4"],
                       env={"WORLD_SIZE": "4"})
    assert layout.returncode == 2
    assert "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)" in layout.stderr

    no_checkpoint = _pretrain([*base, "--data-path", assets.data_prefix, "--load", str(tmp_path / "none")])
    assert no_checkpoint.returncode == 2 and f"--load {tmp_path / 'none'}: no such directory" in no_checkpoint.stderr


def test_precomputed_reference_matches_online_and_is_reused_until_inputs_change(assets, straight, tmp_path):
    online = straight[:3]
    cached_dir = tmp_path / "cached"
    extra = "--train-iters 3 --micro-batch-size 2 --precompute-ref-logps"
    first = run_dpo(assets, cached_dir, nproc=2, extra=extra)  # DP2: each rank computes half the table
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in online], abs=1e-5)
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    tables = list((cached_dir / "reference_logps").glob("*.pt"))
    assert len(tables) == 1

    # The same data and reference in another layout (TP2 policy): the table is reused, losses unchanged.
    checkpoint, flags = assets.checkpoint(2, 1)
    reference, _ = assets.checkpoint(1, 1)
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--tensor-model-parallel-size", "2",
            "--load", str(checkpoint), "--ref-model", str(reference), "--save", str(cached_dir), *extra.split()]
    rerun = run_cli("pretrain_dpo", args, nproc=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reference log-probs: reusing" in rerun.stderr
    assert [r["loss"] for r in read_metrics(cached_dir)] == pytest.approx([r["loss"] for r in online], abs=1e-5)

    # A different reference checkpoint changes the fingerprint: recomputed, and said so.
    other, _ = assets.checkpoint(2, 1, hf=build_tiny_llama(assets.root / "hf_other_ref", assets.vocab_size, seed=7))
    args[args.index("--ref-model") + 1] = str(other)
    changed = run_cli("pretrain_dpo", args, nproc=2)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "fingerprint differs" in changed.stderr
    assert len(list((cached_dir / "reference_logps").glob("*.pt"))) == 2


def test_packed_sequences_give_the_same_losses_as_padded(assets, straight, tmp_path):
    padded = straight[:3]
    # TP2 + sequence parallel splits the THD row across ranks; PP2 stages exchange its varying length.
    packed = run_dpo(assets, tmp_path / "packed", tp=2, pp=2, nproc=4,
                     extra="--train-iters 3 --micro-batch-size 4 --pack-sequences --sequence-parallel")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)
    assert [r["rewards/margins"] for r in packed] == pytest.approx([r["rewards/margins"] for r in padded], abs=1e-5)
    assert [r["logits/chosen"] for r in packed] == pytest.approx([r["logits/chosen"] for r in padded], abs=1e-5)


def test_uneven_pipeline_stages_train_like_one_stage(assets, straight, tmp_path):
    """--num-layer-list 1,3: megatron's pipeline layout builds the stages convert_ckpt.py wrote."""
    even = straight[:3]
    checkpoint, _ = assets.checkpoint(1, 2, num_layer_list=(1, 3))
    uneven = run_dpo(assets, tmp_path / "uneven", pp=2, nproc=2, load=checkpoint,
                     extra="--train-iters 3 --micro-batch-size 4 --num-layer-list 1,3")
    assert [r["loss"] for r in uneven] == pytest.approx([r["loss"] for r in even], abs=1e-5)
    assert [r["grad_norm"] for r in uneven] == pytest.approx([r["grad_norm"] for r in even], rel=1e-5)
    saved = torch.load(tmp_path / "uneven" / "iter_0000003" / "mp_rank_00_001" / "model_optim_rng.pt",
                       weights_only=False)
    assert saved["args"]["num_layer_list"] == [1, 3]  # what the converters and a resume read

    # The run's split must be the checkpoint's: one clear line instead of a weights mismatch.
    checkpoint_flags = assets.checkpoint(1, 2)[1]
    args = [*checkpoint_flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--pipeline-model-parallel-size", "2",
            "--load", str(checkpoint), "--save", str(tmp_path / "wrong"), "--train-iters", "1"]
    wrong = run_cli("pretrain_dpo", args, nproc=2)
    assert wrong.returncode != 0
    assert "splits the layers over pipeline stages as 1,3, the run as 2,2: pass --num-layer-list 1,3" in wrong.stderr


def test_bf16_training_tracks_fp32(assets, straight, tmp_path):
    fp32 = straight[:4]
    # bf16 params and bf16 logits (never upcast whole), fp32 main weights and grad reduction.
    bf16 = run_dpo(assets, tmp_path / "bf16", tp=2, nproc=2,
                   extra="--train-iters 4 --micro-batch-size 4 --bf16 --use-distributed-optimizer")
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # same bf16 forward for policy and reference
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], abs=0.05)
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_fp16_with_dynamic_loss_scaling_tracks_fp32(assets, straight, tmp_path):
    # --fp16: fp16 params, fp32 main weights, megatron's dynamic loss scaler. Its default first scale, 2^32,
    # overflows these gradients: the update is skipped and says so (the scale then backs off).
    overflowing = run_dpo(assets, tmp_path / "overflow", extra="--train-iters 2 --micro-batch-size 4 --fp16")
    assert [r.get("skipped_update") for r in overflowing] == [1, 1]
    assert [r["loss"] for r in overflowing] == pytest.approx([math.log(2)] * 2, abs=1e-6)  # weights untouched
    fp16 = run_dpo(assets, tmp_path / "fp16",
                   extra="--train-iters 3 --micro-batch-size 4 --fp16 --initial-loss-scale 128")
    assert not any("skipped_update" in r for r in fp16)
    assert [r["loss"] for r in fp16] == pytest.approx([r["loss"] for r in straight[:3]], abs=0.05)
