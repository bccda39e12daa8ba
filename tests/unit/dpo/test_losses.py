"""Preference losses against hand-computed values.

Reference point: policy chosen/rejected log-probs -10/-14, reference -11/-12, beta 0.1,
answer lengths 5/7. Margin h = (-10 + 14) - (-11 + 12) = 3.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.dpo.losses import PairLogps, preference_loss, rewards


def logps(average: bool = False) -> PairLogps:
    values = [-10.0, -14.0, -11.0, -12.0]
    if average:
        values = [-10 / 5, -14 / 7, -11 / 5, -12 / 7]
    return PairLogps(*(torch.tensor([v], dtype=torch.float64) for v in values))


@pytest.mark.parametrize(
    "loss_type, smoothing, average, expected",
    [
        ("sigmoid", 0.0, False, 0.554355),  # log(1 + e^-0.3)
        ("sigmoid", 0.1, False, 0.584355),  # 0.9 * 0.554355 + 0.1 * log(1 + e^0.3)
        ("hinge", 0.0, False, 0.7),  # relu(1 - 0.3)
        ("ipo", 0.0, True, 20.378776),  # (0.485714 - 1 / 0.2)^2 on token-averaged log-probs
    ],
)
def test_loss_matches_hand_computed_value(loss_type, smoothing, average, expected):
    value = preference_loss(loss_type, logps(average), beta=0.1, label_smoothing=smoothing).item()
    assert value == pytest.approx(expected, abs=1e-6)


def test_rewards_and_equal_policy_gives_ln2():
    chosen, rejected = rewards(logps(), beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.2)
    same = PairLogps(*(torch.tensor([-3.0]) for _ in range(4)))
    assert preference_loss("sigmoid", same, beta=0.1).item() == pytest.approx(math.log(2), abs=1e-7)


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-14.0], requires_grad=True)
    preference_loss("sigmoid", PairLogps(pc, pr, torch.tensor([-11.0]), torch.tensor([-12.0])), beta=0.1).sum().backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
    expected = -0.1 * torch.sigmoid(torch.tensor(-0.3)).item()
    assert pc.grad.item() == pytest.approx(expected) and pr.grad.item() == pytest.approx(-expected)
