"""The preference stages and losses by name, with the traits flag validation needs.

Torch-free, so flags can be checked (and `--help` printed) without loading the formulas.
A stage is one entry of `STAGE_TRAITS` plus its objective in `engine.dpo.stages`; a loss is
one entry of `LOSS_TRAITS` plus its formula in `engine.dpo.losses` (tests hold the pairs equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LossTraits:
    average_logps: bool = False
    """True when the loss is defined on token-averaged log-probs."""
    label_smoothing: bool = False
    """True when the formula reads --dpo-label-smoothing."""
    sorts_pairs: bool = False
    """True when the loss sorts over the pairs of a micro-batch (needs --micro-batch-size >= 2)."""
    defaults: dict = field(default_factory=dict)
    """Defaults of the options only this loss reads (they are None until the loss is known)."""


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
    "discopop": LossTraits(defaults={"discopop_tau": 0.05}),
    "sigmoid_norm": LossTraits(average_logps=True, label_smoothing=True),
    "aot": LossTraits(label_smoothing=True, sorts_pairs=True),
    "aot_unpaired": LossTraits(label_smoothing=True, sorts_pairs=True),
    "sft": LossTraits(),
    "simpo": LossTraits(average_logps=True, label_smoothing=True, defaults={"simpo_gamma": 1.0}),
    "orpo": LossTraits(average_logps=True),
}

DPO_LOSS_TYPES = tuple(name for name in LOSS_TRAITS if name not in ("simpo", "orpo"))
"""--dpo-loss-type choices under --stage dpo."""
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
"""--dpo-loss-type choices under --stage cpo (TRL's CPOTrainer)."""
SORTED_LOSS_TYPES = tuple(name for name, traits in LOSS_TRAITS.items() if traits.sorts_pairs)
"""Losses that sort over the pairs of a micro-batch."""


@dataclass(frozen=True)
class StageTraits:
    beta: str | None
    """The option holding the stage's beta (ORPO's lambda for orpo); None for rm, which has none."""
    options: tuple[str, ...]
    """The stage-specific options it reads; another stage's option given with it is an error."""
    loss_types: tuple[str, ...] = ()
    """--dpo-loss-type choices; empty when the stage is its own single loss."""
    several_losses: bool = False
    """--dpo-loss-type may name several losses, summed with --dpo-loss-weights."""
    reference: bool = False
    """Trains against a reference policy (unless --reference-free)."""
    nll_per_pair: bool = False
    """Its NLL term is a token mean per pair (RPO, MindSpeed-LLM), not over the global batch's tokens."""
    nll_weight: str | None = None
    """The option weighting its chosen-answer NLL; None: weight 1, built into the objective (ORPO)."""
    defaults: dict = field(default_factory=dict)
    """Defaults of its options (they are None until the stage is known)."""
    data: str = "pairwise"
    """The preprocessed data it trains on: "pairwise" (prompt, chosen, rejected) or "unpaired" (prompt,
    completion, desirable or not: KTO), each with its own shard names (engine/formats.py)."""
    value_head: bool = False
    """The model ends in a scalar value head instead of the vocab projection (a reward model): no log-probs,
    no reference, its own Bradley-Terry loss on the rewards at each sequence's last token."""


_PAIRWISE_DEFAULTS = {"dpo_loss_type": ["sigmoid"], "dpo_beta": 0.1}
STAGE_TRAITS: dict[str, StageTraits] = {
    "dpo": StageTraits("dpo_beta", ("dpo_loss_type", "dpo_beta", "dpo_loss_weights", "ld_alpha", "rpo_alpha"),
                       DPO_LOSS_TYPES, several_losses=True, reference=True, nll_per_pair=True, nll_weight="rpo_alpha",
                       defaults=_PAIRWISE_DEFAULTS),
    "simpo": StageTraits("simpo_beta", ("simpo_beta", "cpo_alpha"), nll_weight="cpo_alpha",
                         defaults={"simpo_beta": 2.0, "cpo_alpha": 0.0}),
    "orpo": StageTraits("orpo_beta", ("orpo_beta", "orpo_prompt_loss"),
                        defaults={"orpo_beta": 0.1, "orpo_prompt_loss": True}),
    "cpo": StageTraits("dpo_beta", ("dpo_loss_type", "dpo_beta", "cpo_alpha"), CPO_LOSS_TYPES,
                       nll_weight="cpo_alpha", defaults={**_PAIRWISE_DEFAULTS, "cpo_alpha": 1.0}),
    "kto": StageTraits("dpo_beta", ("dpo_beta", "kto_desirable_weight", "kto_undesirable_weight"), reference=True,
                       data="unpaired",
                       defaults={"dpo_beta": 0.1, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0}),
    "rm": StageTraits(None, ("center_rewards_coefficient",), value_head=True,
                      defaults={"center_rewards_coefficient": 0.0}),
}
STAGES = tuple(STAGE_TRAITS)
"""--stage choices; what each trains on and against is in its traits (`stage_summary` says it in --help)."""
STAGE_OPTIONS = tuple(sorted({name for traits in STAGE_TRAITS.values() for name in traits.options}))
"""Options that only some stages read."""


def stage_summary() -> str:
    """The --stage help: each stage's reference use and data, read from its traits."""
    def describe(traits: StageTraits) -> str:
        model = ("a reward model (scalar value head)" if traits.value_head
                 else "against a reference policy" if traits.reference else "reference-free")
        data = ("unpaired thumbs-up/down data (preprocess_data.py --handler-name UnpairedHandler or --unpair)"
                if traits.data == "unpaired" else "pairwise data")
        return f"{model}, on {data}"
    return "; ".join(f"{stage}: {describe(traits)}" for stage, traits in STAGE_TRAITS.items())


def option_note(name: str) -> str:
    """Where a stage or loss option applies and its default there, e.g. "--stage dpo, cpo, kto; default 0.1", for
    its --help: read from the traits whose defaults `PreferenceConfig.check` fills in, so the two cannot differ."""
    places: list[tuple[str, object]] = []  # (stage, or stage and loss; the default there)
    for stage, traits in STAGE_TRAITS.items():
        if name in traits.options:
            places.append((stage, traits.defaults.get(name)))
        for loss, loss_traits in LOSS_TRAITS.items():
            if name in loss_traits.defaults and (loss in traits.loss_types or loss == stage):
                where = f"{stage} --dpo-loss-type {loss}" if traits.loss_types else stage
                places.append((where, loss_traits.defaults[name]))
    defaults = [default for _, default in places]
    if all(default == defaults[0] for default in defaults):
        shown = "" if defaults[0] is None else f"; default {_shown(defaults[0])}"
        return "--stage " + ", ".join(where for where, _ in places) + shown
    return "--stage " + ", ".join(f"{where} (default {_shown(default)})" for where, default in places)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
