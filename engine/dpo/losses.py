"""Preference losses: a registry from a loss name to a formula over per-pair log-probs.

Every loss receives the policy's and reference's summed answer log-probs of the chosen
and rejected answers with the answer token counts (`PairLogps`), and returns one loss
per pair. Losses defined on token-averaged log-probs (IPO, sigmoid_norm, SimPO, ORPO)
say so in their `LossSpec` and get `PairLogps.averaged()`. Reference-free objectives
(`--reference-free`, and the SimPO / CPO / ORPO stages) pass zeros as the reference,
which turns the DPO margin into the policy's own margin, as TRL does.

Formulas follow TRL's DPOTrainer / CPOTrainer / ORPOTrainer. With d_c = log pi_c - log ref_c,
d_r = log pi_r - log ref_r and h = d_c - d_r (the DPO margin):

- sigmoid      -(1-e) logsig(b h) - e logsig(-b h)                  (DPO; e = label smoothing: cDPO)
- hinge        relu(1 - b h)                                         (SLiC)
- ipo          (h - 1/(2b))^2 on token-averaged log-probs            (IPO)
- robust       ((1-e)(-logsig(b h)) + e logsig(-b h)) / (1 - 2e)     (rDPO, unbiased under label noise e)
- exo_pair     sig(b h)(logsig(b h) - log(1-e)) + sig(-b h)(logsig(-b h) - log e), e = 1e-3 when 0 (EXO)
- nca_pair     -logsig(b d_c) - logsig(-b d_c)/2 - logsig(-b d_r)/2 (NCA)
- bco_pair     -logsig(b d_c - delta) - logsig(-(b d_r - delta))    (BCO; delta: see `_bco_pair`)
- sppo_hard    (d_c - 1/(2b))^2 + (d_r + 1/(2b))^2                  (SPPO, hard labels)
- apo_zero     1 - sig(b d_c) + sig(b d_r)                           (APO-zero)
- apo_down     sig(b d_c) + 1 - sig(b h)                             (APO-down)
- discopop     (1 - m) (-logsig(b h)) + m exp(-b h), m = sig(b h / tau)  (DiscoPOP)
- sigmoid_norm the sigmoid loss on token-averaged log-probs          (length-normalized DPO)
- aot          sigmoid loss on sorted(pi_c - pi_r) - sorted(ref_c - ref_r)   (AOT, paired)
- aot_unpaired sigmoid loss on sorted(d_c) - sorted(d_r)             (AOT, unpaired; "aot_pair" in TRL 0.x)
- sft          the chosen answers' NLL, a token mean over the global batch (TRL's "sft")
- simpo        -(1-e) logsig(b (a_c - a_r) - g) - e logsig(-(...)) on averages a (SimPO; g the margin)
- orpo         -b logsig(log odds_c - log odds_r), odds = p / (1 - p), p = exp(a)   (ORPO's OR term)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from engine.loss_catalog import LOSS_TRAITS, LossTraits


@dataclass
class PairLogps:
    """Per-pair log-probs [n] of the chosen and rejected answers under policy and reference.

    The four log-probs are sums over answer tokens (length-desensitized under --ld-alpha);
    `chosen_count` / `rejected_count` are the answer token counts that `averaged()` divides by.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_count: torch.Tensor | None = None
    rejected_count: torch.Tensor | None = None
    chosen_nll: torch.Tensor | None = None
    """Token-mean NLL of the chosen answer from raw (not length-desensitized) log-probs; default
    -policy_chosen / chosen_count."""
    chosen_nll_share: torch.Tensor | None = None
    """Each pair's share of the chosen NLL averaged over the tokens of the whole global batch: its
    NLL sum x N / T (N pairs, T tokens in the global batch), so that the mean over the N pairs, the
    reduction megatron applies, is the token mean. Default: this micro-batch taken as the batch."""

    @property
    def logits(self) -> torch.Tensor:
        """The DPO margin h = (log pi_c - log pi_r) - (log ref_c - log ref_r)."""
        return (self.policy_chosen - self.policy_rejected) - (self.reference_chosen - self.reference_rejected)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.reference_rejected

    def averaged(self) -> PairLogps:
        """The same pairs with every log-prob divided by its answer's token count."""
        if self.chosen_count is None or self.rejected_count is None:
            raise ValueError("token-averaged losses need PairLogps.chosen_count and rejected_count")
        c, r = self.chosen_count.clamp(min=1), self.rejected_count.clamp(min=1)
        return replace(self, policy_chosen=self.policy_chosen / c, policy_rejected=self.policy_rejected / r,
                       reference_chosen=self.reference_chosen / c, reference_rejected=self.reference_rejected / r,
                       chosen_count=torch.ones_like(c), rejected_count=torch.ones_like(r),
                       chosen_nll=self.nll(), chosen_nll_share=self.nll_share())

    def nll(self) -> torch.Tensor:
        if self.chosen_nll is not None:
            return self.chosen_nll
        if self.chosen_count is None:
            raise ValueError("the chosen NLL needs PairLogps.chosen_count")
        return -self.policy_chosen / self.chosen_count.clamp(min=1)

    def nll_share(self) -> torch.Tensor:
        if self.chosen_nll_share is not None:
            return self.chosen_nll_share
        if self.chosen_count is None:
            raise ValueError("the chosen NLL needs PairLogps.chosen_count")
        sums = self.nll() * self.chosen_count
        return sums * sums.shape[0] / self.chosen_count.sum().clamp(min=1)


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters a formula may read."""

    beta: float = 0.1
    """--dpo-beta (--simpo-beta for SimPO, --orpo-beta: ORPO's lambda)."""
    label_smoothing: float = 0.0
    """--dpo-label-smoothing: the label-noise rate e of cDPO / rDPO / EXO / AOT / SimPO."""
    discopop_tau: float = 0.05
    """--discopop-tau."""
    simpo_gamma: float = 1.0
    """--simpo-gamma: SimPO's target reward margin, in reward units (the paper's gamma)."""
    bco_delta: float = 0.0
    """BCO's reward shift: the running mean reward of the global batches so far, the current one included."""


@dataclass(frozen=True)
class LossSpec:
    formula: Callable[[PairLogps, LossParams], torch.Tensor]
    """(logps, params) -> loss per pair."""
    traits: LossTraits
    """What flag validation knows of the loss too (engine/loss_catalog.py)."""

    @property
    def average_logps(self) -> bool:
        return self.traits.average_logps

    @property
    def label_smoothing(self) -> bool:
        return self.traits.label_smoothing


def _smoothed_sigmoid(x: torch.Tensor, e: float) -> torch.Tensor:
    return -F.logsigmoid(x) * (1 - e) - F.logsigmoid(-x) * e


def _sigmoid(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); label smoothing gives conservative DPO (cDPO)."""
    return _smoothed_sigmoid(p.beta * logps.logits, p.label_smoothing)


def _hinge(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """SLiC hinge loss on the margin."""
    return torch.relu(1 - p.beta * logps.logits)


def _ipo(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """IPO (Azar et al. 2023): squared distance of the averaged margin to 1 / (2 beta)."""
    return (logps.logits - 1 / (2 * p.beta)) ** 2


def _robust(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """rDPO (Chowdhury et al. 2024): unbiased under a label flip rate e (--dpo-label-smoothing)."""
    h, e = p.beta * logps.logits, p.label_smoothing
    return (-F.logsigmoid(h) * (1 - e) + F.logsigmoid(-h) * e) / (1 - 2 * e)


def _exo_pair(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """EXO (Ji et al. 2024), pairwise: reverse KL to the smoothed label distribution; as in TRL the
    label smoothing e defaults to 1e-3 when 0 (log e must be finite)."""
    h, e = p.beta * logps.logits, p.label_smoothing or 1e-3
    return torch.sigmoid(h) * (F.logsigmoid(h) - math.log(1 - e)) + torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(e))


def _nca_pair(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """NCA (Chen et al. 2024), pairwise: absolute rewards, the chosen pushed up and both away from 0."""
    c, r = p.beta * logps.chosen_logratios, p.beta * logps.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _bco_pair(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """BCO (Jung et al. 2024), pairwise: each answer classified against the reward shift delta.

    delta is the paper's reward shift: the running mean of the implicit rewards b d (chosen and
    rejected) seen in training so far, the current global batch included, detached. The reference
    implementation (TRL 0.x's bco_pair, by the paper's first author, and TRL's BCOTrainer) folds each
    micro-batch's rewards into the mean before using it; the objective does so per global batch, from
    a forward-only pass of the policy before the step (`DPOObjective.before_step`, engine/dpo/stages/dpo.py), so every
    micro-batch, rank and split of the batch uses one delta. TRL 1.x's DPOTrainer bco_pair applies no
    shift (delta 0). Evaluation uses the delta of the last training step without updating it.
    """
    c, r = p.beta * logps.chosen_logratios, p.beta * logps.rejected_logratios
    return -F.logsigmoid(c - p.bco_delta) - F.logsigmoid(-(r - p.bco_delta))


def _sppo_hard(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win/lose labels: d_c -> 1/(2b) and d_r -> -1/(2b)."""
    half = 1 / (2 * p.beta)
    return (logps.chosen_logratios - half) ** 2 + (logps.rejected_logratios + half) ** 2


def _apo_zero(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): raise the chosen, lower the rejected (chosen better than the policy)."""
    return 1 - torch.sigmoid(p.beta * logps.chosen_logratios) + torch.sigmoid(p.beta * logps.rejected_logratios)


def _apo_down(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """APO-down: lower both, the rejected more (chosen worse than the policy)."""
    return torch.sigmoid(p.beta * logps.chosen_logratios) + 1 - torch.sigmoid(p.beta * logps.logits)


def _discopop(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): logistic and exponential losses mixed by sig(b h / tau)."""
    h = p.beta * logps.logits
    mix = torch.sigmoid(h / p.discopop_tau)
    return -F.logsigmoid(h) * (1 - mix) + torch.exp(-h) * mix


def _aot(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: the sigmoid loss on the sorted policy margins minus the sorted
    reference margins. The sort runs over the pairs of one micro-batch on one rank (TRL sorts its
    per-device batch), so the loss depends on --micro-batch-size; with one pair it is the sigmoid loss,
    which validation rejects."""
    policy = torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0).values
    reference = torch.sort(logps.reference_chosen - logps.reference_rejected, dim=0).values
    return _smoothed_sigmoid(p.beta * (policy - reference), p.label_smoothing)


def _aot_unpaired(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """AOT for unpaired data ("aot_pair" in TRL 0.x): chosen and rejected log-ratios sorted independently
    within the micro-batch, then the sigmoid loss on their difference."""
    chosen = torch.sort(logps.chosen_logratios, dim=0).values
    rejected = torch.sort(logps.rejected_logratios, dim=0).values
    return _smoothed_sigmoid(p.beta * (chosen - rejected), p.label_smoothing)


def _sft(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """TRL's "sft" term: the chosen answers' NLL averaged over all their tokens in the global batch
    (a cross-entropy over the batch's tokens), returned as each pair's share of it. --rpo-alpha /
    --pref-ftx add the per-pair token mean instead (the RPO paper, MindSpeed-LLM)."""
    return logps.nll_share()


def _simpo(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """SimPO (Meng et al. 2024) on token-averaged policy log-probs a (no reference):
    -logsig(b (a_c - a_r) - g). g is the paper's gamma (TRL's simpo_gamma; TRL writes the argument
    as b ((a_c - a_r) - g / b), the same number)."""
    margin = logps.policy_chosen - logps.policy_rejected
    return _smoothed_sigmoid(p.beta * margin - p.simpo_gamma, p.label_smoothing)


def log_odds(logps: PairLogps) -> torch.Tensor:
    """ORPO's log odds ratio log(odds_c / odds_r), odds = p / (1 - p), p = exp(token-mean log-prob).
    log(1 - p) is computed as log(-expm1(a)); a is clamped below 0 so a certain answer stays finite."""
    a_c, a_r = (x.clamp(max=-1e-6) for x in (logps.policy_chosen, logps.policy_rejected))
    return (a_c - a_r) - (torch.log(-torch.expm1(a_c)) - torch.log(-torch.expm1(a_r)))


def _orpo(logps: PairLogps, p: LossParams) -> torch.Tensor:
    """ORPO (Hong et al. 2024), its odds-ratio term -lambda logsig(log odds ratio); the objective adds
    the chosen NLL with weight 1."""
    return -p.beta * F.logsigmoid(log_odds(logps))


_FORMULAS = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "robust": _robust, "exo_pair": _exo_pair,
    "nca_pair": _nca_pair, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "apo_zero": _apo_zero,
    "apo_down": _apo_down, "discopop": _discopop, "sigmoid_norm": _sigmoid, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "sft": _sft, "simpo": _simpo, "orpo": _orpo,
}
LOSSES: dict[str, LossSpec] = {name: LossSpec(_FORMULAS[name], traits) for name, traits in LOSS_TRAITS.items()}
"""One formula per loss the catalog names (sigmoid_norm is the sigmoid formula on token-averaged log-probs)."""


def preference_loss(loss_type: str, logps: PairLogps, params: LossParams) -> torch.Tensor:
    spec = LOSSES[loss_type]
    return spec.formula(logps.averaged() if spec.average_logps else logps, params)


def rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards beta * (log pi - log ref) of the chosen and rejected answers."""
    return (
        beta * (logps.policy_chosen - logps.reference_chosen).detach(),
        beta * (logps.policy_rejected - logps.reference_rejected).detach(),
    )
