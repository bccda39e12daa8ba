"""--stage kto end to end on CPU: step-1 loss, KL point and rewards equal values computed independently
from transformers log-probs; TP2 (sequence parallel, packed, with the precomputed reference cache), PP2
(packed) and DP2 agree with TP1 to 1e-5; LoRA against its own base separates desirable from undesirable
completions of a learnable set, and evaluates.

The data are test_dpo.py's learnable pairs turned into unpaired samples by preprocess_data.py --unpair.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_cli
from tests.e2e.dpo_assets import build_tiny_llama, learnable_pairs
from tests.e2e.test_dpo import SEQ, Assets, read_metrics

SEED = 7
TRAIN = (f"--stage kto --split 100,0,0 --dpo-beta 0.1 --lr 1e-3 --lr-decay-style constant --clip-grad 1.0 "
         f"--log-interval 1 --seed {SEED} --micro-batch-size 4 --global-batch-size 16").split()


class KTOAssets(Assets):
    """test_dpo's tokenizer, unpaired shards, a second tiny Llama as the policy and test_dpo's as its reference."""

    def __init__(self, root: Path):
        super().__init__(root)
        from engine.data.preprocess import PreprocessConfig, preprocess
        from engine.tokenizer import TokenizerConfig

        jsonl = root / "kto_pairs.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in learnable_pairs(24)))
        self.unpaired_prefix = str(root / "data" / "unpaired")
        preprocess(PreprocessConfig(input=str(jsonl), output_prefix=self.unpaired_prefix, unpair=True,
                                    tokenizer=TokenizerConfig("PretrainedFromHF", self.tokenizer_dir),
                                    prompt_type="llama3", log_interval=10**6))
        self.hf_reference = self.hf_policy
        self.hf_policy = build_tiny_llama(root / "hf_kto_policy", self.vocab_size, seed=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> KTOAssets:
    return KTOAssets(tmp_path_factory.mktemp("kto"))


def run_kto(assets: KTOAssets, save: Path, tp: int = 1, pp: int = 1, nproc: int = 1, extra: str = "",
            reference: bool = True) -> list[dict]:
    checkpoint, flags = assets.checkpoint(tp, pp)
    ref = ["--ref-model", str(assets.checkpoint(tp, pp, hf=assets.hf_reference)[0])] if reference else []
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.unpaired_prefix, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--load", str(checkpoint), "--save", str(save), *ref,
            *extra.split()]
    result = run_cli("pretrain_dpo", args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_metrics(save)


@pytest.fixture(scope="module")
def tp1_rows(assets, tmp_path_factory):
    return run_kto(assets, tmp_path_factory.mktemp("tp1"), extra="--train-iters 3")


def _hf_logps(hf_dir: Path, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Summed log-probs of each sequence's labelled tokens under the HF model (float64 softmax), in one forward
    over right-padded rows (causal attention: the padding after a sequence does not change its logits)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    length = max(len(ids) for ids, _ in sequences)
    ids = torch.tensor([seq + [0] * (length - len(seq)) for seq, _ in sequences])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in sequences])
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].double()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (target != -100)).sum(dim=-1)


def test_step1_matches_transformers(assets, tp1_rows):
    """The first global batch, read back with the data code (KL blocks, block sampler) for its token ids;
    the log-probs, the KL point, the loss and the rewards computed here from transformers alone."""
    from engine.data.unpaired import BlockBatchSampler, MismatchedPairs, UnpairedDataset

    pairs = MismatchedPairs(UnpairedDataset(assets.unpaired_prefix, 128), 4, 128, SEED)
    batch = next(iter(BlockBatchSampler(len(pairs), 16, 4, 0, 1, SEED)))
    items = [pairs[j] for micro in batch for j in micro]
    desirable = torch.tensor([item["desirable"] for item in items])
    logps = {(model, kind): _hf_logps(hf, [(item[f"{kind}_input_ids"].tolist(), item[f"{kind}_labels"].tolist())
                                           for item in items])
             for model, hf in (("policy", assets.hf_policy), ("reference", assets.hf_reference))
             for kind in ("chosen", "rejected")}  # chosen_*: the completion, rejected_*: the KL completion
    raw_kl = (logps["policy", "rejected"] - logps["reference", "rejected"]).mean()
    kl = raw_kl.clamp(min=0)
    ratios = logps["policy", "chosen"] - logps["reference", "chosen"]
    losses = torch.where(desirable, 1 - torch.sigmoid(0.1 * (ratios - kl)), 1 - torch.sigmoid(0.1 * (kl - ratios)))
    step = tp1_rows[0]
    assert raw_kl > 1e-3  # the reference really differs, and the KL point is not clamped away
    assert 0 < int(desirable.sum()) < len(items)
    assert step["kl"] == pytest.approx(kl.item(), abs=1e-5)
    assert step["loss"] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert step["rewards/chosen"] == pytest.approx(0.1 * ratios[desirable].mean().item(), abs=1e-5)
    assert step["rewards/rejected"] == pytest.approx(0.1 * ratios[~desirable].mean().item(), abs=1e-5)
    assert step["logps/chosen"] == pytest.approx(logps["policy", "chosen"][desirable].mean().item(), rel=1e-5)
    assert step["logps/rejected"] == pytest.approx(logps["policy", "chosen"][~desirable].mean().item(), rel=1e-5)


LAYOUTS = [
    Layout("tp2_sp_packed_cached_reference", 2, "--sequence-parallel --pack-sequences --precompute-ref-logps", tp=2),
    Layout("pp2_packed", 2, "--pack-sequences", pp=2),
    Layout("dp2", 2),
]


@layout_cases(LAYOUTS)
def test_layouts_agree_with_tp1(layout, assets, tp1_rows, tmp_path):
    rows = run_kto(assets, tmp_path, layout.tp, layout.pp, layout.ranks, f"--train-iters 3 {layout.flags}")
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert [r[name] for r in rows] == pytest.approx([r[name] for r in tp1_rows], abs=1e-5), name


def test_learnable_set_separates_desirable_from_undesirable(assets, tmp_path):
    """LoRA against its own base (adapters off): step 1 has log-ratios 0, so every loss is 1 - sigmoid(0); the
margin of desirable over undesirable rewards grows, and an evaluation step runs."""
    rows = run_kto(assets, tmp_path, extra="--train-iters 8 --lr 5e-3 --lora-r 8 --lora-alpha 16 "
                                           "--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 "
                                           "--split 90,10,0 --eval-interval 8 --eval-iters 1",
                   reference=False)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    (valid,) = read_metrics(tmp_path, "valid")  # evaluation computes its own batch's KL point
    assert valid["kl"] >= 0 and 0 < valid["loss"] < 1
    margins = [r["rewards/chosen"] - r["rewards/rejected"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.01
    assert margins[-1] > 0.05 and margins[-1] > margins[0]
