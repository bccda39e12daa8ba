"""Every preference stage trains end to end through `torchrun pretrain_dpo.py` on CPU under TP2 or PP2:
the loss falls, the stage's metrics are logged under TRL's names, and the startup log states the
objective with its hyper-parameters. Reuses test_dpo.py's assets (tiny Llama, learnable pairs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.distributed.harness import run_cli
from tests.e2e.test_dpo import SEQ, Assets, read_metrics

COMMON = ("--is-pairwise-dataset --split 100,0,0 --lr 1e-3 --lr-decay-style constant --clip-grad 1.0 "
          "--log-interval 1 --global-batch-size 8 --train-iters 5").split()

CASES = [  # (name, TP, PP, flags, what the startup log must say, extra metrics)
    ("simpo", 2, 1, "--stage simpo --micro-batch-size 4",  # --cpo-alpha 0: no NLL term, no nll_loss
     "objective simpo: loss = simpo | --simpo-beta 2, --dpo-label-smoothing 0, --simpo-gamma 1", []),
    ("orpo", 1, 2, "--stage orpo --orpo-beta 0.2 --micro-batch-size 2",
     "objective orpo: loss = orpo + 1*nll | --orpo-beta 0.2, token-averaged log-probs for orpo, reference-free, "
     "nll: mean over the global batch's chosen prompt and answer tokens (--orpo-prompt-loss)",
     ["nll_loss", "log_odds_ratio", "log_odds_chosen"]),
    ("cpo", 2, 1, "--stage cpo --micro-batch-size 4",
     "objective cpo: loss = sigmoid + 1*nll | --dpo-beta 0.1, --dpo-label-smoothing 0, reference-free, "
     "nll: mean over the global batch's chosen answer tokens", ["nll_loss"]),
    ("dpo_weighted", 2, 1, "--dpo-loss-type robust apo_zero --dpo-loss-weights 0.5 1 --dpo-label-smoothing 0.1 "
     "--ld-alpha 0.7 --rpo-alpha 0.1 --micro-batch-size 4",
     "objective dpo: loss = 0.5*robust + 1*apo_zero + 0.1*nll | --dpo-beta 0.1, --dpo-label-smoothing 0.1, "
     "--ld-alpha 0.7, reference model", ["nll_loss"]),
    ("dpo_free_aot", 1, 2, "--reference-free --dpo-loss-type aot_unpaired --micro-batch-size 2",
     "objective dpo: loss = aot_unpaired | --dpo-beta 0.1, --dpo-label-smoothing 0, reference-free", []),
    ("dpo_bco", 1, 2, "--dpo-loss-type bco_pair --micro-batch-size 2",
     "objective dpo: loss = bco_pair | --dpo-beta 0.1, bco delta: running mean reward, current batch included, "
     "reference model", []),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("objectives"))


def run_objective(assets: Assets, save: Path, tp: int, pp: int, flags: str):
    checkpoint, model_flags = assets.checkpoint(tp, pp)
    args = [*model_flags, *SEQ, *COMMON, "--data-path", assets.data_prefix, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--load", str(checkpoint), "--save", str(save), *flags.split()]
    result = run_cli("pretrain_dpo", args, nproc=tp * pp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_metrics(save), result.stdout + result.stderr


@pytest.mark.parametrize("name, tp, pp, flags, described, extra_metrics", CASES, ids=[c[0] for c in CASES])
def test_stage_trains_with_falling_loss(assets, tmp_path, name, tp, pp, flags, described, extra_metrics):
    rows, log = run_objective(assets, tmp_path / name, tp, pp, flags)
    assert described in log
    reference_free = "--stage" in flags or "--reference-free" in flags  # the dpo cases leave --stage at dpo
    assert ("| reference none |" in log) == reference_free
    losses = [row["loss"] for row in rows]
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    for metric in ["rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", *extra_metrics]:
        assert metric in rows[-1], metric
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    if name == "dpo_weighted":  # step 1, policy = reference (both length-desensitized): robust ln 2, apo_zero 1
        assert rows[0]["loss"] == pytest.approx(0.5 * math.log(2) + 1 + 0.1 * rows[0]["nll_loss"], abs=1e-5)
    if name == "dpo_bco":  # step 1: rewards 0, so delta 0 and each answer's term is ln 2
        assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
        # delta is the running mean reward of the batches so far, the current one included
        means = [(row["rewards/chosen"] + row["rewards/rejected"]) / 2 for row in rows]
        assert [row["delta"] for row in rows] == pytest.approx(
            [sum(means[:k + 1]) / (k + 1) for k in range(len(rows))], abs=1e-6)
