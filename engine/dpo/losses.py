"""Preference losses: a registry from --dpo-loss-type to a formula over per-pair log-probs.

Every loss receives the policy's and reference's sequence log-probs of the chosen and
rejected answers (summed over answer tokens, or token-averaged where the loss says so)
and returns one loss per pair. The trainer adds `--pref-ftx` x the chosen NLL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per-pair log-probs [n] of the chosen and rejected answers under policy and reference."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        """The DPO margin h = (log pi_c - log pi_r) - (log ref_c - log ref_r)."""
        return (self.policy_chosen - self.policy_rejected) - (self.reference_chosen - self.reference_rejected)


@dataclass(frozen=True)
class LossSpec:
    formula: Callable[[PairLogps, float, float], torch.Tensor]
    """(logps, beta, label_smoothing) -> loss per pair."""
    average_logps: bool = False
    """True when the loss is defined on token-averaged log-probs (IPO)."""


def _sigmoid(logps: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); label smoothing gives conservative DPO (cDPO)."""
    h = beta * logps.logits
    return -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing


def _hinge(logps: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC hinge loss on the margin."""
    return torch.relu(1 - beta * logps.logits)


def _ipo(logps: PairLogps, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): squared distance of the averaged margin to 1 / (2 beta)."""
    return (logps.logits - 1 / (2 * beta)) ** 2


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(_sigmoid),
    "hinge": LossSpec(_hinge),
    "ipo": LossSpec(_ipo, average_logps=True),
}


def preference_loss(loss_type: str, logps: PairLogps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    return LOSSES[loss_type].formula(logps, beta, label_smoothing)


def rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta * (log pi - log ref) of the chosen and rejected answers."""
    return (
        beta * (logps.policy_chosen - logps.reference_chosen).detach(),
        beta * (logps.policy_rejected - logps.reference_rejected).detach(),
    )
