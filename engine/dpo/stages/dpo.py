"""--stage dpo: the shared pairwise objective against a reference, plus BCO's reward shift.

The shift (`bco_pair`) is the running mean of the rewards of every global batch so far, the
current one included (the BCO paper's reference code); it is state carried across steps and
checkpoints, and logged under TRL's BCOTrainer name `delta`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from engine.dpo.losses import PairLogps, rewards
from engine.dpo.objective import PairwiseObjective, SequenceLogps


class DPOObjective(PairwiseObjective):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bco_delta, self.bco_steps = 0.0, 0

    @property
    def needs_current_logps(self) -> bool:
        return any(name == "bco_pair" for _, name in self.terms)

    def stage_params(self) -> dict:
        return {"bco_delta": self.bco_delta}

    def stage_metrics(self, pair_logps: PairLogps, chosen_rewards: torch.Tensor, n: int) -> dict:
        if not self.needs_current_logps:
            return {}
        pairs = chosen_rewards.new_full((), n, dtype=torch.float32)
        return {"delta": torch.stack([pairs * self.bco_delta, pairs])}

    def stage_metric_names(self) -> tuple[str, ...]:
        return ("delta",) if self.needs_current_logps else ()

    def before_step(self, items: list, policy_logps: list[torch.Tensor | None], groups=()) -> None:
        """Fold the global batch's mean reward into BCO's running mean delta before its step.

        The (sum, count) of the rewards is summed over `groups` (data parallel, then pipeline: ranks
        before the last stage add zeros), so every rank folds in the same mean. Each global batch
        weighs the same, which is the mean over all rewards seen when batches are equal.
        """
        device = items[0][0].labels.device
        local = torch.zeros(2, dtype=torch.float64, device=device)
        for (batch, reference), packed in zip(items, policy_logps):
            if packed is None:
                continue
            chosen, rejected = rewards(self.pair_logps(SequenceLogps.unpack(packed), reference), self.beta)
            local += torch.stack([chosen.sum() + rejected.sum(), chosen.new_full((), 2.0 * batch.num_pairs)]).double()
        for group in groups:
            dist.all_reduce(local, group=group)
        total, count = local.tolist()
        mean_reward = total / count if count else math.nan
        if math.isfinite(mean_reward):  # a non-finite batch (its update is skipped) does not poison delta
            self.bco_steps += 1
            self.bco_delta += (mean_reward - self.bco_delta) / self.bco_steps

    def state_dict(self) -> dict:
        return {"bco_delta": self.bco_delta, "bco_steps": self.bco_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bco_delta = float(state.get("bco_delta", 0.0))
        self.bco_steps = int(state.get("bco_steps", 0))
