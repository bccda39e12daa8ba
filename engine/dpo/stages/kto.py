"""--stage kto (Ethayarajh et al. 2024): preference training from unpaired thumbs-up / thumbs-down samples.

TRL's KTOTrainer with loss_type="kto": with r = log pi(y|x) - log ref(y|x) of a sample's completion
(summed over its tokens) and z the KL reference point,

    desirable:    w_d (1 - sigmoid(beta (r - z)))
    undesirable:  w_u (1 - sigmoid(beta (z - r)))

averaged over the samples. z is the mean of log pi(y'|x) - log ref(y'|x) over mismatched pairs
(each prompt with another sample's completion, engine/data/unpaired.py), averaged over the data-parallel
ranks, clamped at 0 and detached: a constant of the step, as in TRL.

TRL computes z per forward batch; here it is the mean over the whole global batch (all micro-batches
and DP ranks, the same as TRL's with one accumulation step), so the step does not depend on how the
batch is split: a forward-only pass of the policy over the batch before its step (`before_step`, the
hook BCO's reward shift uses) gives the KL completions' log-probs, and the reference's come with the
completions' from the reference pass or the cache. The gradient pass then runs on the completions
alone (`UnpairedBatch.completions`). Metrics follow TRL's names; rewards/* and logps/* of a kind count
only the samples of that kind in the global batch, and are left out when it has none.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from engine.arguments import PreferenceConfig
from engine.dpo.logprobs import vocab_parallel_logprobs, vocab_parallel_mean_logits
from engine.dpo.objective import PairwiseObjective, _row_sequence_index, _row_sequence_sums, _sequence_selection
from engine.formats import IGNORE_INDEX


def kto_losses(logratios: torch.Tensor, kl: torch.Tensor, desirable: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Per-sample KTO losses [n] (TRL's loss_type="kto", Eq. 7 of the KTO paper), weights applied."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)


class KTOObjective(PairwiseObjective):
    """The reference pass and the pre-step pass run the shared pairwise code on (completion, KL completion)
    pairs; the loss, its KL point and its metrics are KTO's own."""

    needs_current_logps = True
    current_logps_in_eval = True

    def __init__(self, preference: PreferenceConfig, vocab_size: int, half_precision: bool = False):
        self.preference = preference
        self.model_kwargs = {"fp32_output": False} if half_precision else {}
        self.vocab_size = vocab_size
        self.beta = preference.beta
        self.desirable_weight = preference.kto_desirable_weight
        self.undesirable_weight = preference.kto_undesirable_weight
        # What the inherited pairwise `sequence_logps` reads: plain answer sums, no NLL term.
        self.terms, self.ld_alpha, self.nll_weight = [], None, 0.0
        self.reference_free, self.nll_per_pair, self.nll_over_batch, self.nll_over_prompt = False, False, False, False
        self.kl: torch.Tensor | None = None
        """The KL point of the current global batch, set by `before_step`."""

    def before_step(self, items: list, policy_logps: list[torch.Tensor | None], groups=()) -> None:
        """z of the global batch: the mean over its KL completions (the second half of each micro-batch's
        sequences) of policy - reference log-probs, summed over `groups` (data parallel, then pipeline:
        ranks before the last stage add zeros), clamped at 0."""
        device = items[0][0].labels.device
        local = torch.zeros(2, dtype=torch.float64, device=device)
        for (batch, reference), packed in zip(items, policy_logps):
            if packed is None:
                continue
            n = batch.num_pairs
            ratios = packed[0, n:] - reference.to(packed.device)[0, n:]
            local += torch.stack([ratios.sum().double(), ratios.new_full((), n, dtype=torch.float64)])
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(local, group=group)
        self.kl = (local[0] / local[1].clamp(min=1)).clamp(min=0).float()

    def policy_forward_step(self, data_iterator, model):
        batch, reference = next(data_iterator)
        view = batch.completions()
        output = self._forward(model, view)
        return output, partial(self.loss_func, batch, view, reference)

    def loss_func(self, batch, view, reference: torch.Tensor | None, logits: torch.Tensor):
        if reference is None:
            raise ValueError("--stage kto needs reference log-probs")
        if self.kl is None:
            raise ValueError("--stage kto: the KL point of the batch is not set; run before_step first")
        n = batch.num_pairs
        token_logps = vocab_parallel_logprobs(logits, view.labels, self.vocab_size)
        selection = None if view.sequence_ids is None else _sequence_selection(view.sequence_ids, n)
        policy = _row_sequence_sums(token_logps, selection)
        logratios = policy - reference.to(policy.device)[0, :n]
        kl = self.kl.to(policy.device)
        desirable = batch.desirable
        losses = kto_losses(logratios, kl, desirable, self.beta, self.desirable_weight, self.undesirable_weight)
        total = losses.sum()
        metrics = self._kto_metrics(view, logits, policy.detach(), self.beta * logratios.detach(), kl, desirable)
        metrics["loss"] = torch.stack([total.detach().float(), total.new_full((), n, dtype=torch.float32)])
        return total, total.new_full((), n, dtype=torch.int), metrics

    def _kto_metrics(self, view, logits, policy, rewards, kl, desirable) -> dict:
        """(sum, count) pairs: per kind over the samples of that kind, logits/* over their completion tokens."""
        n = desirable.shape[0]
        undesirable = ~desirable
        mask = view.labels != IGNORE_INDEX
        mean_logits = vocab_parallel_mean_logits(logits.detach(), self.vocab_size) * mask
        token_desirable = desirable[_row_sequence_index(view).clamp(max=n - 1)] & mask
        token_undesirable = undesirable[_row_sequence_index(view).clamp(max=n - 1)] & mask

        def over(values: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.where(kind, values, 0).float().sum(), kind.float().sum()])

        return {
            "rewards/chosen": over(rewards, desirable),
            "rewards/rejected": over(rewards, undesirable),
            "logps/chosen": over(policy, desirable),
            "logps/rejected": over(policy, undesirable),
            "logits/chosen": over(mean_logits, token_desirable),
            "logits/rejected": over(mean_logits, token_undesirable),
            "kl": torch.stack([kl.float() * n, kl.new_full((), n, dtype=torch.float32)]),
        }

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(sorted(["loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                             "logits/chosen", "logits/rejected"]))
