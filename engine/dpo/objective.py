"""The DPO forward_step / loss_func pair for megatron's pipeline schedules.

The model, the data and the loss meet here. A micro-batch holds `[chosen x n ;
rejected x n]` rows; the policy's logits become per-sequence log-probs on the last
pipeline stage, where the reference's log-probs for the same rows (computed
beforehand by `ReferencePolicy`) are waiting. The loss function returns the sum of
per-pair losses and the pair count, and megatron divides gradients by the global
pair count, so the loss of a global batch does not depend on how it is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from engine.dpo.logprobs import IGNORE_INDEX, vocab_parallel_logprobs, vocab_parallel_mean_logits
from engine.dpo.losses import LOSSES, PairLogps, preference_loss, rewards


@dataclass
class SequenceLogps:
    """Per-row answer log-probs of a micro-batch: `total` summed over answer tokens, `count` tokens."""

    total: torch.Tensor
    count: torch.Tensor

    def value(self, average: bool) -> torch.Tensor:
        return self.total / self.count.clamp(min=1) if average else self.total

    def halves(self, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.value(average)
        n = values.shape[0] // 2
        return values[:n], values[n:]


class DPOObjective:
    """Forward steps for the policy (with loss) and for the reference (log-probs only)."""

    def __init__(self, loss_type: str, beta: float, label_smoothing: float, pref_ftx: float, vocab_size: int):
        if loss_type not in LOSSES:
            raise ValueError(f"--dpo-loss-type {loss_type!r} is not one of {', '.join(LOSSES)}")
        self.loss_type = loss_type
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.pref_ftx = pref_ftx
        self.vocab_size = vocab_size
        self.average_logps = LOSSES[loss_type].average_logps

    def sequence_logps(self, logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogps:
        token_logps = vocab_parallel_logprobs(logits, labels, self.vocab_size)
        return SequenceLogps(token_logps.sum(dim=-1), (labels != IGNORE_INDEX).sum(dim=-1))

    # Reference: forward only, results collected as non-loss data on the last stage.
    def reference_forward_step(self, data_iterator, model):
        batch, _ = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, None)
        return output, partial(self._reference_logps, batch)

    def _reference_logps(self, batch, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        logps = self.sequence_logps(logits, batch.labels)
        return torch.stack([logps.total.detach(), logps.count.to(logps.total.dtype)])

    # Policy: forward, then the loss against the reference's log-probs.
    def policy_forward_step(self, data_iterator, model):
        batch, reference = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, None)
        return output, partial(self.loss_func, batch, reference)

    def loss_func(self, batch, reference: torch.Tensor, logits: torch.Tensor):
        n = batch.num_pairs
        policy = self.sequence_logps(logits, batch.labels)
        ref = SequenceLogps(reference[0], reference[1])
        pc, pr = policy.halves(self.average_logps)
        rc, rr = ref.halves(self.average_logps)
        pair_logps = PairLogps(pc, pr, rc, rr)
        losses = preference_loss(self.loss_type, pair_logps, self.beta, self.label_smoothing)
        metrics = self._metrics(batch, logits, policy, pair_logps, losses)
        if self.pref_ftx > 0:
            # Chosen-answer NLL, a token mean per pair, averaged over pairs with the DPO loss.
            nll = -policy.total[:n] / policy.count[:n].clamp(min=1)
            losses = losses + self.pref_ftx * nll
            metrics["nll_loss"] = _mean_pair(nll.detach(), n)
        total = losses.sum()
        metrics["loss"] = torch.stack([total.detach(), torch.tensor(float(n), dtype=total.dtype)])
        return total, torch.tensor(n, dtype=torch.int), metrics

    def _metrics(self, batch, logits, policy: SequenceLogps, pair_logps: PairLogps, losses) -> dict:
        n = batch.num_pairs
        chosen_rewards, rejected_rewards = rewards(pair_logps, self.beta)
        mask = batch.labels != IGNORE_INDEX
        mean_logits = vocab_parallel_mean_logits(logits.detach(), self.vocab_size) * mask
        totals = policy.total.detach()
        return {
            "rewards/chosen": _mean_pair(chosen_rewards, n),
            "rewards/rejected": _mean_pair(rejected_rewards, n),
            "rewards/accuracies": _mean_pair((chosen_rewards > rejected_rewards).float(), n),
            "rewards/margins": _mean_pair(chosen_rewards - rejected_rewards, n),
            "logps/chosen": _mean_pair(totals[:n], n),
            "logps/rejected": _mean_pair(totals[n:], n),
            "logits/chosen": torch.stack([mean_logits[:n].sum(), mask[:n].sum().float()]),
            "logits/rejected": torch.stack([mean_logits[n:].sum(), mask[n:].sum().float()]),
        }


def _mean_pair(values: torch.Tensor, n: int) -> torch.Tensor:
    """(numerator, denominator) for a mean over pairs, reduced later over micro-batches and ranks."""
    return torch.stack([values.float().sum(), torch.tensor(float(n))])
