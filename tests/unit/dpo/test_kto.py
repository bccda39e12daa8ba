"""--stage kto's loss, KL point and metrics against hand-computed values.

A fake model makes the values readable (as in test_objective.py): the policy's log-prob of a target
token is -0.1 x its id, the reference's `ref` x its id. Two samples (prompt | completion):

    S0: 5 6 | 7 8 9   completion ids sum 24      its KL completion (S1's): 4
    S1: 1 2 3 | 4     completion ids sum 4       its KL completion (S0's): 7 8 9

so with ref = -0.15 the log-ratios are 0.05 x the id sums: S0 1.2, S1 0.2, and the KL point is the mean
over the KL completions, (0.2 + 1.2) / 2 = 0.7; with ref = -0.05 the KL mean is -0.7, clamped to 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import engine.dpo.objective as objective_module
import engine.dpo.stages.kto as kto_module
from engine.arguments import PreferenceConfig
from engine.data.unpaired import collate_unpaired
from engine.dpo.stages import build_objective
from engine.dpo.stages.kto import kto_losses

M = -100


def item(prompt: list[int], completion: list[int], kl_completion: list[int], desirable: bool) -> dict:
    a = np.asarray
    return {"chosen_input_ids": a(prompt + completion), "chosen_labels": a([M] * len(prompt) + completion),
            "rejected_input_ids": a(prompt + kl_completion), "rejected_labels": a([M] * len(prompt) + kl_completion),
            "desirable": desirable}


def samples(first_desirable: bool = True, second_desirable: bool = False) -> list[dict]:
    return [item([5, 6], [7, 8, 9], [4], first_desirable), item([1, 2, 3], [4], [7, 8, 9], second_desirable)]


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    for module in (objective_module, kto_module):
        monkeypatch.setattr(module, "vocab_parallel_logprobs",
                            lambda logits, labels, vocab: logits[..., 0] * (labels != M))
        monkeypatch.setattr(module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])


def logits(batch, scale: float) -> torch.Tensor:
    """A fake model's logits: `scale` x the next token; at the batch's `OutputRows` when it has them (the
    reference and pre-step passes), else at every position (the loss's completions view)."""
    if batch.outputs is not None:
        return (scale * batch.outputs.targets.double()).unsqueeze(-1)
    return (scale * batch.tokens.roll(-1, dims=-1).double()).unsqueeze(-1)


def step(items: list[dict], ref: float, packed: bool = False, **flags):
    """One global batch of one micro-batch: reference pass, pre-step KL pass, loss. Returns (loss, metrics)."""
    obj = build_objective(PreferenceConfig(stage="kto", **flags), vocab_size=16)
    batch = collate_unpaired(items, 8, packed)
    reference = obj._reference_logps(batch, logits(batch, ref))
    obj.before_step([(batch, reference)], [obj._reference_logps(batch, logits(batch, -0.1))])
    view = batch.completions()
    loss, count, metrics = obj.loss_func(batch, view, reference, logits(view, -0.1))
    return loss.item() / int(count), {name: value.tolist() for name, value in metrics.items()}


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("packed", [False, True])
def test_weights_and_kl_point_by_hand(packed):
    loss, metrics = step(samples(), ref=-0.15, packed=packed, kto_desirable_weight=2.0, kto_undesirable_weight=0.5)
    desirable = 2.0 * (1 - sig(0.1 * (1.2 - 0.7)))
    undesirable = 0.5 * (1 - sig(0.1 * (0.7 - 0.2)))
    assert metrics["kl"][0] / metrics["kl"][1] == pytest.approx(0.7)
    assert loss == pytest.approx((desirable + undesirable) / 2)
    assert metrics["rewards/chosen"] == pytest.approx([0.12, 1.0])
    assert metrics["rewards/rejected"] == pytest.approx([0.02, 1.0])
    assert metrics["logps/chosen"] == pytest.approx([-2.4, 1.0])
    assert metrics["logps/rejected"] == pytest.approx([-0.4, 1.0])
    assert metrics["logits/chosen"] == pytest.approx([-2.4, 3.0])  # the fake mean logit is the token log-prob


def test_kl_point_is_clamped_at_zero():
    loss, metrics = step(samples(), ref=-0.05)  # KL mean -0.7; log-ratios -1.2 and -0.2
    assert metrics["kl"] == pytest.approx([0.0, 2.0])
    assert loss == pytest.approx(((1 - sig(0.1 * -1.2)) + (1 - sig(0.1 * (0 + 0.2)))) / 2)


def test_a_batch_with_only_desirable_samples_counts_no_rejected_ones():
    loss, metrics = step(samples(True, True), ref=-0.15)
    assert loss == pytest.approx(((1 - sig(0.1 * (1.2 - 0.7))) + (1 - sig(0.1 * (0.2 - 0.7)))) / 2)
    assert metrics["rewards/rejected"] == [0.0, 0.0] and metrics["logps/rejected"] == [0.0, 0.0]
    assert metrics["rewards/chosen"] == pytest.approx([0.14, 2.0])


def test_losses_formula_against_trl_definition():
    logratios, kl = torch.tensor([1.0, -2.0, 0.3]), torch.tensor(0.5)
    desirable = torch.tensor([True, False, False])
    out = kto_losses(logratios, kl, desirable, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert out.tolist() == pytest.approx([2 * (1 - sig(0.05)), 0.5 * (1 - sig(0.25)), 0.5 * (1 - sig(0.02))])
