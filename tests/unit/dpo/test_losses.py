"""Preference losses and the objective against hand-computed values.

Reference point: policy chosen/rejected log-probs -10/-14, reference -11/-12, beta 0.1,
answer lengths 5/7. Margin h = (-10 + 14) - (-11 + 12) = 3; chosen log-ratio d_c = 1,
rejected d_r = -2; token-averaged: -2, -2, -2.2, -1.714286 (margin 0.485714).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import engine.dpo.objective as objective_module
from engine.arguments import PreferenceConfig
from engine.data.collate import collate_pairs
from engine.dpo.losses import LOSSES, LossParams, PairLogps, log_odds, preference_loss, rewards
from engine.loss_catalog import DPO_LOSS_TYPES
from engine.dpo.objective import PairwiseObjective
from engine.dpo.stages import build_objective
from tests.output_rows import at_outputs


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def logps(policy=(-10.0, -14.0), reference=(-11.0, -12.0), counts=(5, 7)) -> PairLogps:
    return PairLogps(_t([policy[0]]), _t([policy[1]]), _t([reference[0]]), _t([reference[1]]),
                     _t([counts[0]]), _t([counts[1]]))


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    "loss_type, smoothing, expected",
    [
        ("sigmoid", 0.0, 0.554355),  # log(1 + e^-0.3)
        ("sigmoid", 0.1, 0.584355),  # cDPO: 0.9 * 0.554355 + 0.1 * log(1 + e^0.3)
        ("hinge", 0.0, 0.7),  # relu(1 - 0.3)
        ("ipo", 0.0, 20.378776),  # (0.485714 - 1 / 0.2)^2 on token-averaged log-probs
        ("robust", 0.1, 0.516855),  # (0.9 * 0.554355 - 0.1 * 0.854355) / 0.8
        ("nca_pair", 0.0, 1.315664),  # softplus(-0.1) + softplus(0.1) / 2 + softplus(-0.2) / 2
        ("bco_pair", 0.0, 1.242536),  # delta 0: softplus(-0.1) + softplus(-0.2)
        ("sppo_hard", 0.0, 25.0),  # (1 - 5)^2 + (-2 + 5)^2
        ("apo_zero", 0.0, 0.925187),  # 1 - sigmoid(0.1) + sigmoid(-0.2)
        ("apo_down", 0.0, 0.950537),  # sigmoid(0.1) + 1 - sigmoid(0.3)
        ("sigmoid_norm", 0.0, 0.669156),  # log(1 + e^-0.0485714): each answer normalized by its own length
    ],
)
def test_issue_reference_values(loss_type, smoothing, expected):
    value = preference_loss(loss_type, logps(), LossParams(beta=0.1, label_smoothing=smoothing)).item()
    assert value == pytest.approx(expected, abs=1e-6)


def test_rewards_at_the_reference_point_and_equal_policy_gives_ln2():
    chosen, rejected = rewards(logps(), beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)
    same = logps((-3.0, -3.0), (-3.0, -3.0))
    for name in ("sigmoid", "robust", "sigmoid_norm", "discopop"):
        expected = math.log(2) if name != "discopop" else 0.5 * math.log(2) + 0.5  # mix sigmoid(0) = 1/2
        assert preference_loss(name, same, LossParams(beta=0.1)).item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize(
    "loss_type, params, expected",
    [
        # m = sigmoid(0.3 / 0.05); (1 - m) softplus(-0.3) + m e^-0.3
        ("discopop", LossParams(beta=0.1, discopop_tau=0.05),
         (1 - 1 / (1 + math.exp(-6))) * softplus(-0.3) + 1 / (1 + math.exp(-6)) * math.exp(-0.3)),
        ("discopop", LossParams(beta=0.1, discopop_tau=1.0),
         (1 - 1 / (1 + math.exp(-0.3))) * softplus(-0.3) + 1 / (1 + math.exp(-0.3)) * math.exp(-0.3)),
        # EXO: s(h)(logsig(h) - log(1 - e)) + s(-h)(logsig(-h) - log e), e = 1e-3 when 0
        ("exo_pair", LossParams(beta=0.1, label_smoothing=0.1),
         1 / (1 + math.exp(-0.3)) * (-softplus(-0.3) - math.log(0.9))
         + 1 / (1 + math.exp(0.3)) * (-softplus(0.3) - math.log(0.1))),
        ("exo_pair", LossParams(beta=0.1),
         1 / (1 + math.exp(-0.3)) * (-softplus(-0.3) - math.log(0.999))
         + 1 / (1 + math.exp(0.3)) * (-softplus(0.3) - math.log(1e-3))),
        # BCO with a reward shift delta 0.05: softplus(-(0.1 - 0.05)) + softplus(-0.2 - 0.05)
        ("bco_pair", LossParams(beta=0.1, bco_delta=0.05), softplus(-0.05) + softplus(-0.25)),
        ("sft", LossParams(), 2.0),  # -(-10) / 5: one pair is its own batch
        ("robust", LossParams(beta=0.1), 0.554355),  # e = 0: the sigmoid loss
    ],
)
def test_more_formulas_against_hand_values(loss_type, params, expected):
    assert preference_loss(loss_type, logps(), params).item() == pytest.approx(expected, abs=1e-6)


def test_reference_free_losses_use_the_policy_margin():
    free = logps(reference=(0.0, 0.0))
    # CPO sigmoid: -logsigmoid(beta (pi_c - pi_r)) = softplus(-0.4)
    assert preference_loss("sigmoid", free, LossParams(beta=0.1)).item() == pytest.approx(softplus(-0.4))
    # SimPO on averages a_c = -10/5, a_r = -14/7 (margin 0): -logsigmoid(2 * 0 - 1)
    assert preference_loss("simpo", free, LossParams(beta=2.0, simpo_gamma=1.0)).item() == pytest.approx(softplus(1))
    unequal = logps((-5.0, -14.0), (0.0, 0.0))  # a_c = -1, a_r = -2
    value = preference_loss("simpo", unequal, LossParams(beta=2.0, simpo_gamma=0.5)).item()
    assert value == pytest.approx(softplus(-(2.0 * 1 - 0.5)))
    # ORPO: log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
    odds = 1 - (math.log(1 - math.exp(-1)) - math.log(1 - math.exp(-2)))
    assert log_odds(unequal.averaged()).item() == pytest.approx(odds)
    assert preference_loss("orpo", unequal, LossParams(beta=0.1)).item() == pytest.approx(0.1 * softplus(-odds))


def test_aot_sorts_over_the_micro_batch():
    pairs = PairLogps(_t([-10.0, -8.0]), _t([-14.0, -9.0]), _t([-11.0, -7.0]), _t([-12.0, -10.0]),
                      _t([5, 5]), _t([7, 7]))
    params = LossParams(beta=0.1)
    # paired: policy margins [4, 1] -> [1, 4]; reference margins [1, 3] -> [1, 3]; deltas [0, 1]
    assert preference_loss("aot", pairs, params).tolist() == pytest.approx([math.log(2), softplus(-0.1)])
    # unpaired: d_c [1, -1] -> [-1, 1]; d_r [-2, 1] -> [-2, 1]; deltas [1, 0]
    assert preference_loss("aot_unpaired", pairs, params).tolist() == pytest.approx([softplus(-0.1), math.log(2)])
    # one pair: both are the sigmoid loss (why validation wants --micro-batch-size >= 2)
    for name in ("aot", "aot_unpaired"):
        assert preference_loss(name, logps(), params).item() == pytest.approx(0.554355, abs=1e-6)


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-14.0], requires_grad=True)
    pairs = PairLogps(pc, pr, torch.tensor([-11.0]), torch.tensor([-12.0]))
    preference_loss("sigmoid", pairs, LossParams(beta=0.1)).sum().backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
    expected = -0.1 * torch.sigmoid(torch.tensor(-0.3)).item()
    assert pc.grad.item() == pytest.approx(expected) and pr.grad.item() == pytest.approx(-expected)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_and_differentiable(name):
    pc, pr = _t([-10.0, -30.0]).requires_grad_(True), _t([-14.0, -2.0]).requires_grad_(True)
    pairs = PairLogps(pc, pr, _t([-11.0, -29.0]), _t([-12.0, -3.0]), _t([5, 9]), _t([7, 2]))
    loss = preference_loss(name, pairs, LossParams(beta=0.1, label_smoothing=0.1 if LOSSES[name].label_smoothing else 0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0


# -- the objective: log-probs from token log-probs, reference packing, LD-DPO, weights, NLL --------------

@pytest.fixture
def plain_logprobs(monkeypatch):
    """Token log-probs given directly as logits[..., 0] (no TP group needed): the objective's own logic."""
    monkeypatch.setattr(objective_module, "vocab_parallel_logprobs",
                        lambda logits, labels, vocab: logits[..., 0] * (labels != -100))
    monkeypatch.setattr(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])


def _pair_batch(chosen: list[float], rejected: list[float]):
    """One pair: a prompt token, then answer tokens whose log-probs are given, padding to a common width."""
    sample = {}
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        sample[f"{side}_input_ids"] = np.ones(1 + len(answer), dtype=np.int64)
        sample[f"{side}_labels"] = np.array([-100] + [1] * len(answer))
    batch = collate_pairs([sample])
    width = batch.tokens.shape[1]  # position t predicts answer token t
    rows = [[*answer, *[0.0] * (width - len(answer))] for answer in (chosen, rejected)]
    return batch, at_outputs(torch.tensor(rows, dtype=torch.float64).unsqueeze(-1), batch)


def _objective(**flags) -> PairwiseObjective:
    return build_objective(PreferenceConfig(**flags), vocab_size=10)


def _loss(objective: PairwiseObjective, batch, reference, policy):
    """loss_func on a micro-batch that is the whole global batch."""
    objective.share_global_counts([batch])
    return objective.loss_func(batch, reference, policy)


def test_ld_alpha_down_weights_the_excess_over_the_shorter_answer(plain_logprobs):
    batch, policy = _pair_batch([-1.0, -2.0, -3.0], [-0.5, -1.5])
    _, reference = _pair_batch([-2.0, -2.0, -2.0], [-1.0, -1.0])
    objective = _objective(ld_alpha=0.5)
    packed = objective._reference_logps(batch, reference)
    # shared length 2: chosen -3 + 0.5 * -3 = -4.5 (policy), -4 + 0.5 * -2 = -5 (reference); rejected unchanged
    assert packed.tolist() == [[-6.0, -2.0], [3.0, 2.0], [-4.0, -2.0]]
    pairs = objective.pair_logps(objective.sequence_logps(policy, batch), packed)
    assert [pairs.policy_chosen.item(), pairs.reference_chosen.item()] == [-4.5, -5.0]
    h = (-4.5 + 2.0) - (-5.0 + 2.0)  # 0.5
    loss, count, metrics = objective.loss_func(batch, packed, policy)
    assert loss.item() == pytest.approx(softplus(-0.1 * h)) and count.item() == 1
    assert metrics["rewards/chosen"][0].item() == pytest.approx(0.1 * 0.5)
    # alpha 1 is plain DPO; without --ld-alpha the reference pass packs two rows
    plain = _objective()
    assert plain._reference_logps(batch, reference).shape[0] == 2
    h_plain = (-6.0 + 2.0) - (-6.0 + 2.0)
    assert plain.loss_func(batch, plain._reference_logps(batch, reference), policy)[0].item() == \
        pytest.approx(softplus(-0.1 * h_plain))
    assert _objective(ld_alpha=1.0).loss_func(batch, _objective(ld_alpha=1.0)._reference_logps(batch, reference),
                                              policy)[0].item() == pytest.approx(math.log(2))


def test_weighted_losses_nll_terms_and_reference_free(plain_logprobs):
    batch, policy = _pair_batch([-1.0, -2.0, -3.0], [-0.5, -1.5])
    _, reference = _pair_batch([-2.0, -2.0, -2.0], [-1.0, -1.0])
    h, nll = (-6.0 + 2.0) - (-6.0 + 2.0), 6.0 / 3
    objective = _objective(dpo_loss_type=["sigmoid", "sft"], dpo_loss_weights=[0.7, 0.3], rpo_alpha=0.5)
    loss, _, metrics = _loss(objective, batch, objective._reference_logps(batch, reference), policy)
    assert loss.item() == pytest.approx(0.7 * softplus(-0.1 * h) + 0.3 * nll + 0.5 * nll)
    assert metrics["nll_loss"][0].item() == pytest.approx(nll)
    # reference-free DPO: the reference is zeros, rewards are beta x policy log-probs
    free = _objective(reference_free=True, dpo_loss_type="apo_zero")
    loss, _, metrics = free.loss_func(batch, None, policy)
    assert loss.item() == pytest.approx(1 - 1 / (1 + math.exp(0.6)) + 1 / (1 + math.exp(0.2)))
    assert metrics["rewards/chosen"][0].item() == pytest.approx(-0.6)
    # ORPO (answer-only NLL here; the prompt's is tested in test_objective.py): NLL + lambda x odds-ratio
    # term on averages a_c = -2, a_r = -1; TRL's metric names
    orpo = _objective(stage="orpo", orpo_prompt_loss=False)
    odds = (-2 + 1) - (math.log(1 - math.exp(-2)) - math.log(1 - math.exp(-1)))
    loss, _, metrics = _loss(orpo, batch, None, policy)
    assert loss.item() == pytest.approx(nll + 0.1 * softplus(-odds))
    assert metrics["log_odds_chosen"][0].item() == pytest.approx(odds)
    assert metrics["log_odds_ratio"][0].item() == pytest.approx(-softplus(-odds))
    assert metrics["rewards/chosen"][0].item() == pytest.approx(0.1 * -6)  # beta x summed log-prob (issue #22)
    # SimPO with a CPO-style NLL mix; CPO's default NLL weight is 1
    simpo = _objective(stage="simpo", cpo_alpha=0.2)
    assert _loss(simpo, batch, None, policy)[0].item() == pytest.approx(softplus(-(2.0 * (-2 + 1) - 1.0)) + 0.2 * nll)
    cpo = _objective(stage="cpo")
    assert _loss(cpo, batch, None, policy)[0].item() == pytest.approx(softplus(-0.1 * (-6 + 2)) + nll)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        _objective().loss_func(batch, None, policy)


def test_bco_delta_is_the_running_mean_of_the_batches_so_far_including_the_current_one(plain_logprobs):
    objective = _objective(dpo_loss_type="bco_pair")
    assert objective.params().bco_delta == 0.0 and objective.needs_current_logps
    batch, policy = _pair_batch([-1.0, -2.0, -3.0], [-0.5, -1.5])
    _, reference = _pair_batch([-2.0, -2.0, -3.0], [-1.0, -1.0])
    ref = objective._reference_logps(batch, reference)
    # d_c = -6 + 7 = 1, d_r = -2 + 2 = 0: rewards 0.1 and 0, mean 0.05; the step's own batch is in delta
    objective.before_step([(batch, ref)], [objective._reference_logps(batch, policy)])
    assert objective.params().bco_delta == pytest.approx(0.05)
    loss, _, metrics = objective.loss_func(batch, ref, policy)
    assert loss.item() == pytest.approx(2 * softplus(-0.05))  # softplus(-(0.1 - 0.05)) + softplus(0 - 0.05)
    assert metrics["delta"].tolist() == pytest.approx([0.05, 1.0])
    loss = loss.item()
    assert loss != pytest.approx(softplus(-0.1) + softplus(0.0))  # TRL 1.x's bco_pair: no shift
    # the next batch: rewards 0.1 x (d_c, d_r) = (0.3, 0.2), mean 0.25; delta = (0.05 + 0.25) / 2
    _, later = _pair_batch([-0.5, -1.5, -2.0], [0.0, 0.0])
    objective.before_step([(batch, ref)], [objective._reference_logps(batch, later)])
    assert objective.params().bco_delta == pytest.approx(0.15)
    _, broken = _pair_batch([float("nan"), -1.0, -2.0], [0.0, 0.0])  # a non-finite batch leaves delta
    objective.before_step([(batch, ref)], [objective._reference_logps(batch, broken)])
    assert objective.params().bco_delta == pytest.approx(0.15)
    restored = _objective(dpo_loss_type="bco_pair")
    restored.load_state_dict(objective.state_dict())
    assert restored.params().bco_delta == objective.params().bco_delta and restored.bco_steps == 2


def test_dpo_loss_types_cover_the_issue():
    assert set(DPO_LOSS_TYPES) >= {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                                   "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "aot",
                                   "aot_unpaired"}
