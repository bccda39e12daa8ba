"""The names of the preference stages and losses, with the traits flag validation needs.

Torch-free, so flags can be checked (and `--help` printed) without loading the formulas;
`engine.dpo.losses` registers one formula per name listed here, and a test holds the two
registries equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossTraits:
    average_logps: bool = False
    """True when the loss is defined on token-averaged log-probs."""
    label_smoothing: bool = False
    """True when the formula reads --dpo-label-smoothing."""
    sorts_pairs: bool = False
    """True when the loss sorts over the pairs of a micro-batch (needs --micro-batch-size >= 2)."""


LOSS_TRAITS: dict[str, LossTraits] = {
    "sigmoid": LossTraits(label_smoothing=True),
    "hinge": LossTraits(),
    "ipo": LossTraits(average_logps=True),
    "robust": LossTraits(label_smoothing=True),
    "exo_pair": LossTraits(label_smoothing=True),
    "nca_pair": LossTraits(),
    "bco_pair": LossTraits(),
    "sppo_hard": LossTraits(),
    "apo_zero": LossTraits(),
    "apo_down": LossTraits(),
    "discopop": LossTraits(),
    "sigmoid_norm": LossTraits(average_logps=True, label_smoothing=True),
    "aot": LossTraits(label_smoothing=True, sorts_pairs=True),
    "aot_unpaired": LossTraits(label_smoothing=True, sorts_pairs=True),
    "sft": LossTraits(),
    "simpo": LossTraits(average_logps=True, label_smoothing=True),
    "orpo": LossTraits(average_logps=True),
}

STAGES = ("dpo", "simpo", "orpo", "cpo")
"""--stage choices; all but dpo are reference-free (no reference model is built)."""
DPO_LOSS_TYPES = tuple(name for name in LOSS_TRAITS if name not in ("simpo", "orpo"))
"""--dpo-loss-type choices under --stage dpo."""
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
"""--dpo-loss-type choices under --stage cpo (TRL's CPOTrainer)."""
SORTED_LOSS_TYPES = tuple(name for name, traits in LOSS_TRAITS.items() if traits.sorts_pairs)
"""Losses that sort over the pairs of a micro-batch."""
