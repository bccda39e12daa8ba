"""--stage orpo (Hong et al. 2024): the shared pairwise objective plus TRL's ORPO metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.dpo.losses import PairLogps, log_odds
from engine.dpo.objective import PairwiseObjective, mean_pair


class ORPOObjective(PairwiseObjective):
    def stage_metrics(self, pair_logps: PairLogps, chosen_rewards: torch.Tensor, n: int) -> dict:
        """TRL's ORPO names: the mean of logsigmoid(log odds ratio), and the mean log odds ratio."""
        odds = log_odds(pair_logps.averaged()).detach()
        return {"log_odds_ratio": mean_pair(F.logsigmoid(odds), n), "log_odds_chosen": mean_pair(odds, n)}

    def stage_metric_names(self) -> tuple[str, ...]:
        return ("log_odds_ratio", "log_odds_chosen")
