"""The forward_step / loss_func pair of the pairwise preference stages, for megatron's schedules.

`PairwiseObjective` is what every pairwise stage shares; a stage (engine/dpo/stages/) adds
only what is its own, as read from its traits in engine/loss_catalog.py.

The model, the data and the loss meet here. A micro-batch holds `[chosen x n ;
rejected x n]` rows (or, packed, the same sequences in one THD row); the policy's
logits become per-sequence log-probs on the last pipeline stage, where the
reference's log-probs for the same sequences (computed beforehand by
`ReferencePolicy`) are waiting. The loss function returns the sum of
per-pair losses and the pair count, and megatron divides gradients by the global
pair count, so the loss of a global batch does not depend on how it is split.

Terms that are token means over the whole global batch (TRL's sft, CPO's and ORPO's NLL)
are added as each pair's NLL sum x N / T, with N pairs and T tokens in the global batch:
after megatron's division by N the term is sum / T, whatever the split into micro-batches
and ranks. N and T come from one all-reduce per global batch (`share_global_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from engine.arguments import PreferenceConfig
from engine.dpo.logprobs import vocab_parallel_logprobs, vocab_parallel_mean_logits
from engine.dpo.losses import LOSSES, LossParams, PairLogps, preference_loss, rewards
from engine.formats import IGNORE_INDEX
from engine.model.attention import HostPackedSeqParams
from engine.model.gpt import routing_padding_mask
from engine.model.provider import unwrap_model


@dataclass
class SequenceLogps:
    """Per-row answer log-probs of a micro-batch: `total` summed over answer tokens, `count` tokens.

    Under --ld-alpha, `shared` is the sum over the first k answer tokens, k the length of the
    shorter answer of the row's pair (LD-DPO's public length l_p). Under ORPO's prompt loss,
    `prompt_total` / `prompt_count` are the sum and count over the predicted prompt tokens.
    """

    total: torch.Tensor
    count: torch.Tensor
    shared: torch.Tensor | None = None
    prompt_total: torch.Tensor | None = None
    prompt_count: torch.Tensor | None = None

    def value(self, average: bool) -> torch.Tensor:
        return self.total / self.count.clamp(min=1) if average else self.total

    def halves(self, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.value(average)
        n = values.shape[0] // 2
        return values[:n], values[n:]

    def desensitized(self, ld_alpha: float | None) -> torch.Tensor:
        """LD-DPO (Liu et al. 2024): shared part + alpha x the excess over the shorter answer."""
        if ld_alpha is None:
            return self.total
        return self.shared + ld_alpha * (self.total - self.shared)

    def pack(self) -> torch.Tensor:
        """[2 or 3, rows]: what the reference pass hands to the policy's loss."""
        rows = [self.total, self.count.to(self.total.dtype)] + ([self.shared] if self.shared is not None else [])
        return torch.stack([row.detach() for row in rows])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> SequenceLogps:
        return cls(packed[0], packed[1], packed[2] if packed.shape[0] > 2 else None)


class PairwiseObjective:
    """Forward steps for the policy (with loss) and for the reference (log-probs only).

    The loss is `PreferenceConfig.loss_terms`, a weighted sum of registry losses, plus
    `nll_weight` x the chosen NLL: a token mean per pair where the stage says so (--stage dpo:
    --rpo-alpha / --pref-ftx, as the RPO paper and MindSpeed-LLM), else a token mean over the
    global batch (cpo / simpo: --cpo-alpha; orpo: weight 1, prompt tokens included unless
    --no-orpo-prompt-loss), as TRL's trainers and the ORPO authors. Reference-free objectives get
    no reference log-probs (None) and use zeros, which makes the DPO margin the policy's own
    margin (TRL's CPO/ORPO definitions, and its reference_free DPO).

    Metrics follow TRL's names: rewards/* are beta x (log pi - log ref) of the answers' summed
    log-probs (LD-desensitized under --ld-alpha, as TRL) whatever the loss normalizes; logps/* are
    the policy log-probs TRL's trainer logs: DPOTrainer's per-answer sums under --stage dpo, the
    log-probs the loss takes (token means for ipo, simpo, orpo) under cpo, simpo and orpo.
    Stage hooks: `stage_metrics`, `before_step` and `state_dict` (no-ops here).
    """

    def __init__(self, preference: PreferenceConfig, vocab_size: int, half_precision: bool = False):
        self.preference = preference
        # bf16/fp16 models: keep the logits in the model dtype (Float16Module would upcast the whole
        # [b, s, vocab] tensor); the log-prob kernel upcasts chunk by chunk.
        self.model_kwargs = {"fp32_output": False} if half_precision else {}
        self.terms = preference.loss_terms
        self.beta = preference.beta
        self.ld_alpha = preference.ld_alpha
        self.nll_weight = preference.nll_weight
        self.vocab_size = vocab_size
        self.reference_free = not preference.uses_reference
        per_pair = preference.traits.nll_per_pair
        # CPOTrainer / ORPOTrainer log the log-probs their loss takes; DPOTrainer logs the sums.
        self.logged_logps_averaged = not per_pair and all(LOSSES[name].average_logps for _, name in self.terms)
        self.nll_per_pair = per_pair and self.nll_weight > 0
        # A term is a token mean over the global batch: micro-batches need `share_global_counts`.
        self.nll_over_batch = (not per_pair and self.nll_weight > 0) or any(name == "sft" for _, name in self.terms)
        self.nll_over_prompt = bool(preference.orpo_prompt_loss)

    def params(self) -> LossParams:
        pref = self.preference
        return LossParams(beta=self.beta, label_smoothing=pref.dpo_label_smoothing,
                          discopop_tau=pref.discopop_tau or 0.05, simpo_gamma=pref.simpo_gamma or 0.0,
                          **self.stage_params())

    def stage_params(self) -> dict:
        """LossParams fields a stage keeps as state (BCO's reward shift)."""
        return {}

    def sequence_logps(self, logits: torch.Tensor, batch) -> SequenceLogps:
        """Per-sequence answer log-probs [2n]: chosen of pair i at i, its rejected at n + i.

        `logits` [1, K, vocab / TP] are the model's at the batch's `OutputRows` (the positions with a
        target), which say what each row predicts and where it belongs; their order does not matter.
        Every per-sequence quantity is a reduction without atomics (`_sequence_sums`), so the same batch
        gives the same bits on every run, on CUDA too."""
        rows = batch.outputs
        if self.nll_over_prompt and not rows.prompt_targets:
            raise ValueError("ORPO's prompt loss needs the prompt positions' logits: collate the micro-batch "
                             "with prompt_targets=True")
        selection = _sequence_selection(rows.sequence_ids, 2 * batch.num_pairs)
        answer = rows.answer_ordinal > 0
        # One log-prob pass over every selected position (the prompt's too under ORPO's prompt loss).
        token_logps = vocab_parallel_logprobs(logits, rows.targets, self.vocab_size)
        count = _sequence_sums(answer.long(), selection)
        logps = SequenceLogps(_sequence_sums(torch.where(answer, token_logps, 0), selection), count)
        if self.nll_over_prompt:
            prompt = (rows.targets != IGNORE_INDEX) & ~answer
            logps.prompt_total = _sequence_sums(torch.where(prompt, token_logps, 0), selection)
            logps.prompt_count = _sequence_sums(prompt.long(), selection)
        if self.ld_alpha is not None:
            # Sequence i and i + n form a pair; answer tokens past the shorter answer's length are the excess.
            n = batch.num_pairs
            public = torch.minimum(count[:n], count[n:]).repeat(2)
            within = answer & (rows.answer_ordinal <= public[rows.sequence_ids.clamp(min=0)])
            logps.shared = _sequence_sums(torch.where(within, token_logps, 0), selection)
        return logps

    def _forward(self, model, batch):
        """Padded rows go in as they are (causal attention); a packed row goes in the THD layout; --shared-prompt
        rows carry their pairs' layouts to the attention and rotate each token by its position id. The output
        layer runs on the batch's `OutputRows` only, when it has them: this TP rank's share of them under sequence
        parallelism. An MoE model's routers leave the batch's padding out of their losses (`routing_padding_mask`)."""
        kwargs = dict(self.model_kwargs)
        if self.output_rows and batch.outputs is not None:  # else (RM; KTO's loss view) at every position
            shards = batch.outputs.index.shape[0]
            kwargs["output_rows"] = batch.outputs.index[
                parallel_state.get_tensor_model_parallel_rank() if shards > 1 else 0]
        layouts = tuple(batch.pair_layouts) if batch.pair_layouts is not None else None
        if batch.cu_seqlens is not None:
            kwargs["packed_seq_params"] = HostPackedSeqParams(
                qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
                max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen, seq_lengths=tuple(batch.seq_lengths),
                pair_layouts=layouts)
        elif layouts is not None:
            length = batch.tokens.shape[1]
            kwargs["packed_seq_params"] = HostPackedSeqParams(qkv_format="sbhd", max_seqlen_q=length,
                                                              max_seqlen_kv=length, pair_layouts=layouts)
        if layouts is not None:
            kwargs["rope_from_position_ids"] = True
        kwargs.update(routing_padding_mask(unwrap_model(model), batch.padding))
        return model(batch.tokens, batch.position_ids, None, **kwargs)

    # Reference: forward only, results collected as non-loss data on the last stage.
    def reference_forward_step(self, data_iterator, model):
        batch, _ = next(data_iterator)
        output = self._forward(model, batch)
        return output, partial(self._reference_logps, batch)

    def _reference_logps(self, batch, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        return self.sequence_logps(logits, batch).pack()

    # Policy: forward, then the loss against the reference's log-probs.
    def policy_forward_step(self, data_iterator, model):
        batch, reference = next(data_iterator)
        output = self._forward(model, batch)
        return output, partial(self.loss_func, batch, reference)

    def pair_logps(self, policy: SequenceLogps, reference: torch.Tensor | None,
                   nll_share: torch.Tensor | None = None) -> PairLogps:
        n = policy.total.shape[0] // 2
        values = policy.desensitized(self.ld_alpha)
        if reference is None:
            if not self.reference_free:
                raise ValueError("this objective needs reference log-probs")
            ref_values = torch.zeros_like(values)
        else:
            ref_values = SequenceLogps.unpack(reference.to(values.device)).desensitized(self.ld_alpha)
        count = policy.count.to(values.dtype)
        nll = -policy.total[:n] / count[:n].clamp(min=1)  # raw log-probs, never length-desensitized
        return PairLogps(values[:n], values[n:], ref_values[:n], ref_values[n:], count[:n], count[n:], nll,
                         nll_share)

    # Token means over the global batch: its pair and token counts, shared before the step.
    def _nll_tokens(self, batch) -> torch.Tensor:
        """Mask of the selected positions a batch-token NLL averages over: the chosen answers' (TRL's
        sft, CPO), with their prompts' under ORPO's prompt loss."""
        rows = batch.outputs
        tokens = rows.targets != IGNORE_INDEX if self.nll_over_prompt else rows.answer_ordinal > 0
        return tokens & (rows.sequence_ids >= 0) & (rows.sequence_ids < batch.num_pairs)

    def share_global_counts(self, micro_batches: list, group=None) -> None:
        """Sets `global_pairs` and `global_nll_tokens` on this rank's micro-batches of one global batch:
        counted on the device, summed over `group` (data parallel) in one all-reduce, never read back
        to the host. Does nothing when no term averages over the batch's tokens."""
        if not self.nll_over_batch:
            return
        device = micro_batches[0].outputs.targets.device
        pairs = torch.full((), sum(b.num_pairs for b in micro_batches), device=device)  # a fill, not a copy
        counts = torch.stack([pairs, sum(self._nll_tokens(b).sum() for b in micro_batches)])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        for batch in micro_batches:
            batch.global_pairs, batch.global_nll_tokens = counts[0], counts[1]

    def _nll_share(self, batch, policy: SequenceLogps) -> torch.Tensor | None:
        """Each pair's chosen NLL sum x N / T (see `PairLogps.chosen_nll_share`)."""
        if not self.nll_over_batch:
            return None
        if getattr(batch, "global_nll_tokens", None) is None:
            raise ValueError("this objective averages its NLL over the global batch's tokens: pass the micro-batches "
                             "through PairwiseObjective.share_global_counts before the step")
        n = batch.num_pairs
        sums = -policy.total[:n] - (policy.prompt_total[:n] if policy.prompt_total is not None else 0)
        return sums * (batch.global_pairs.to(sums.dtype) / batch.global_nll_tokens.clamp(min=1).to(sums.dtype))

    def loss_func(self, batch, reference: torch.Tensor | None, logits: torch.Tensor):
        n = batch.num_pairs
        policy = self.sequence_logps(logits, batch)
        pair_logps = self.pair_logps(policy, reference, self._nll_share(batch, policy))
        params = self.params()
        losses = sum(weight * preference_loss(name, pair_logps, params) for weight, name in self.terms)
        metrics = self._metrics(batch, logits, policy, pair_logps)
        if self.nll_weight > 0:
            nll = pair_logps.nll() if self.nll_per_pair else pair_logps.nll_share()
            losses = losses + self.nll_weight * nll
        if self.nll_per_pair:
            metrics["nll_loss"] = mean_pair(pair_logps.nll().detach(), n)
        elif self.nll_over_batch:  # the token mean: sums and counts reduced over micro-batches and ranks
            nll_sum, tokens = -policy.total[:n].detach().sum(), policy.count[:n].sum()
            if policy.prompt_total is not None:
                nll_sum = nll_sum - policy.prompt_total[:n].detach().sum()
                tokens = tokens + policy.prompt_count[:n].sum()
            metrics["nll_loss"] = torch.stack([nll_sum.float(), tokens.float()])
        total = losses.sum()
        metrics["loss"] = torch.stack([total.detach(), total.new_full((), n)])
        return total, total.new_full((), n, dtype=torch.int), metrics

    def _metrics(self, batch, logits, policy: SequenceLogps, pair_logps: PairLogps) -> dict:
        n = batch.num_pairs
        chosen_rewards, rejected_rewards = rewards(pair_logps, self.beta)
        logged = pair_logps.averaged() if self.logged_logps_averaged else pair_logps
        rows = batch.outputs
        mask = rows.answer_ordinal > 0
        mean_logits = vocab_parallel_mean_logits(logits.detach(), self.vocab_size) * mask
        chosen = rows.sequence_ids < n
        chosen_tokens, rejected_tokens = mask & chosen, mask & ~chosen
        metrics = {
            "rewards/chosen": mean_pair(chosen_rewards, n),
            "rewards/rejected": mean_pair(rejected_rewards, n),
            "rewards/accuracies": mean_pair((chosen_rewards > rejected_rewards).float(), n),
            "rewards/margins": mean_pair(chosen_rewards - rejected_rewards, n),
            "logps/chosen": mean_pair(logged.policy_chosen.detach(), n),
            "logps/rejected": mean_pair(logged.policy_rejected.detach(), n),
            "logits/chosen": torch.stack([(mean_logits * chosen_tokens).sum(), chosen_tokens.sum().float()]),
            "logits/rejected": torch.stack([(mean_logits * rejected_tokens).sum(), rejected_tokens.sum().float()]),
        }
        metrics.update(self.stage_metrics(pair_logps, chosen_rewards, n))
        return metrics

    def stage_metrics(self, pair_logps: PairLogps, chosen_rewards: torch.Tensor, n: int) -> dict:
        """Metrics of the stage's own, as (numerator, denominator) pairs."""
        return {}

    def stage_metric_names(self) -> tuple[str, ...]:
        """The names `stage_metrics` returns."""
        return ()

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names `loss_func` returns metrics under, sorted: known before any step, so every rank reduces
        the same metrics in the same order without the last pipeline stage sending their names each step."""
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", *self.stage_metric_names()]
        if self.nll_per_pair or self.nll_over_batch:
            names.append("nll_loss")
        return tuple(sorted(names))

    # Stage state: carried across steps (and checkpoints).
    output_rows = True
    """The model's output layer runs on the batch's `OutputRows` (a reward model's value head runs on every
    position, `RewardGPTModel`)."""
    needs_current_logps = False
    """The loss reads the current batch's policy log-probs before its step (BCO's reward shift): the
    trainer then runs a forward-only pass over the batch and hands the result to `before_step`."""
    current_logps_in_eval = False
    """`before_step` also runs before each evaluation batch (KTO's KL point of that batch; BCO's running
    shift is training state, so its evaluation leaves it alone)."""

    def before_step(self, items: list, policy_logps: list[torch.Tensor | None], groups=()) -> None:
        """Updates the stage's state from the step's (batch, reference) items and the policy's packed
        log-probs of them (None before the last pipeline stage), reduced over `groups`."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`."""


def _sequence_selection(sequence_ids: torch.Tensor, count: int) -> torch.Tensor:
    """[count, K] one-hot of the positions' sequences (sequence k's positions in row k; padding, -1, in none)."""
    sequences = torch.arange(count, device=sequence_ids.device)
    return sequence_ids == sequences.unsqueeze(-1)


def _sequence_sums(values: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """The sum of `values` ([1, K], one per selected position) over each of the 2n sequences' positions, [2n],
    without atomics.

    `index_add` / `scatter_reduce` sum with atomic adds on CUDA, in an order that changes from run to run,
    and so do the last bits of each sum, of the loss, of every update: no bit-exact rerun or resume.
    The row is masked once per sequence (`selection`, through `torch.where`, so a NaN stays in its own
    sequence) and summed along the row: each sequence is reduced on its own, by the reduction kernel's
    fixed tree, forward and backward elementwise. The cost is [2n, K] elements per sum (16 sequences and
    32k positions: 2 MiB in fp32), small beside the logits. Rejected alternatives: differences of a cumsum
    over the row subtract running totals of the whole row (fp32 loses the small sums' digits as the row
    grows; a floating cumsum is also nondeterministic on CUDA); a one-hot matmul needs the same memory and
    may run in TF32; gathering the sequences into a [2n, longest] block scatters in backward.
    """
    return torch.where(selection, values, 0).sum(dim=-1)


def _row_sequence_index(batch) -> torch.Tensor:
    """For a batch without `OutputRows` (outputs at every position, [rows, L]): which of the 2n sequences each
    position belongs to: row r for padded rows; for a packed row its `sequence_ids`, with the padding tail (no
    labels) counted under sequence 0."""
    if batch.sequence_ids is None:
        rows, length = batch.labels.shape
        return torch.arange(rows, device=batch.labels.device).unsqueeze(1).expand(rows, length)
    return batch.sequence_ids.clamp(min=0)


def _row_sequence_selection(batch) -> torch.Tensor | None:
    """For a batch without `OutputRows`: [2n, t] one-hot of the packed row's sequences (sequence k's positions in
    row k); None for padded rows, where row r already is sequence r."""
    return None if batch.sequence_ids is None else _sequence_selection(batch.sequence_ids, 2 * batch.num_pairs)


def _row_sequence_sums(values: torch.Tensor, selection: torch.Tensor | None) -> torch.Tensor:
    """`_sequence_sums` over a batch without `OutputRows` (`values` [rows, L]): a row sum for padded rows
    (`selection` None: one sequence a row), else the packed row masked once per sequence."""
    if selection is None:
        return values.sum(dim=-1)
    return _sequence_sums(values, selection)


def mean_pair(values: torch.Tensor, n: int) -> torch.Tensor:
    """(numerator, denominator) for a mean over pairs, reduced later over micro-batches and ranks.

    The count is a fill on the device (`new_full`), not a tensor copied from a Python number: on CUDA such
    a copy waits for the stream, and this runs for every metric of every micro-batch."""
    return torch.stack([values.float().sum(), values.new_full((), n, dtype=torch.float32)])
