"""--stage rm: a reward model trained on the pairwise data with the Bradley-Terry loss.

The model is the decoder with a scalar value head (engine/model/value_head.py); the reward of a
sequence is the head's value at its last token, the last position of the sequence (padded rows and
THD-packed rows alike), which is where transformers' `*ForSequenceClassification` reads it (the last
token before padding). Per pair, as TRL's RewardTrainer:

    loss = -log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2

with the pair's margin from the data (a `margin` column preprocessed beside the shards; 0 without one)
and c = --center-rewards-coefficient. No reference model, no log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.arguments import PreferenceConfig
from engine.dpo.objective import PairwiseObjective, _row_sequence_selection, mean_pair
from engine.formats import IGNORE_INDEX

METRICS = ("loss", "rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected")


def last_token_values(values: torch.Tensor, batch) -> torch.Tensor:
    """The value at each of the 2n sequences' last token, [2n] (chosen of pair i at i, its rejected at n + i).

    A sequence's answer runs to its end and its last token has no next-token label, so the last token
    is one past its last labelled position; a max over positions, no atomics."""
    mask = batch.labels != IGNORE_INDEX
    positions = torch.arange(mask.shape[-1], device=mask.device)
    selection = _row_sequence_selection(batch)
    if selection is None:  # padded: row r is sequence r
        last = torch.where(mask, positions, -1).amax(dim=-1) + 1
        return values.gather(1, last.unsqueeze(1)).squeeze(1)
    last = torch.where(selection & mask, positions, -1).amax(dim=-1) + 1
    return values[0, last]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair loss of TRL's RewardTrainer: -logsigmoid(r_c - r_r - margin) + c (r_c + r_r)^2."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss


class RewardObjective(PairwiseObjective):
    """The forward step and loss of a reward model; shares the pairwise forward (padded or THD rows) and the
    trainer's hooks with `PairwiseObjective` (no global counts, no state, no current-log-prob pass)."""

    output_rows = False

    def __init__(self, preference: PreferenceConfig, vocab_size: int, half_precision: bool = False):
        self.preference = preference
        self.model_kwargs = {}  # the head's [b, s] values are small: Float16Module returns them in fp32
        self.center = preference.center_rewards_coefficient or 0.0
        self.nll_over_batch = False
        self.reference_free = True

    def rewards(self, values: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = last_token_values(values.float(), batch)
        return rewards[:batch.num_pairs], rewards[batch.num_pairs:]

    def loss_func(self, batch, reference: None, values: torch.Tensor):
        n = batch.num_pairs
        chosen, rejected = self.rewards(values, batch)
        margin = batch.margins.to(chosen.dtype) if batch.margins is not None else 0.0
        losses = bradley_terry_loss(chosen, rejected, margin, self.center)
        total = losses.sum()
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "loss": torch.stack([total.detach(), total.new_full((), n)]),
            "rewards/chosen": mean_pair(chosen, n),
            "rewards/rejected": mean_pair(rejected, n),
            "rewards/margins": mean_pair(chosen - rejected, n),
            "rewards/accuracies": mean_pair((chosen > rejected).float(), n),
        }
        return total, total.new_full((), n, dtype=torch.int), metrics

    def reference_forward_step(self, data_iterator, model):
        raise ValueError("--stage rm has no reference model")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS
