"""The stage registry: --stage name -> its objective.

A pairwise stage whose behaviour its traits (engine/loss_catalog.py STAGE_TRAITS) describe in full
uses `PairwiseObjective` as it is (simpo, cpo); a stage with state or metrics of its own has a
module here (dpo: BCO's reward shift; orpo: the odds-ratio metrics; kto: its own loss, KL point and
metrics over unpaired data; rm: the reward model's loss on its value head's outputs).
"""

from __future__ import annotations

from engine.arguments import PreferenceConfig
from engine.dpo.objective import PairwiseObjective
from engine.dpo.stages.dpo import DPOObjective
from engine.dpo.stages.kto import KTOObjective
from engine.dpo.stages.orpo import ORPOObjective
from engine.dpo.stages.rm import RewardObjective

OBJECTIVES: dict[str, type[PairwiseObjective]] = {
    "dpo": DPOObjective,
    "simpo": PairwiseObjective,
    "orpo": ORPOObjective,
    "cpo": PairwiseObjective,
    "rm": RewardObjective,
    "kto": KTOObjective,
}


def build_objective(preference: PreferenceConfig, vocab_size: int, half_precision: bool = False) -> PairwiseObjective:
    return OBJECTIVES[preference.stage](preference, vocab_size, half_precision)
