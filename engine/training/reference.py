"""The frozen reference policy: log-probs of every micro-batch before the policy's step.

It runs the same forward code as the policy (same model builder, same
`PairwiseObjective.sequence_logps`) through a forward-only pipeline pass, so with the
reference equal to the initial policy the first DPO loss is exactly ln 2. The
results land on the last pipeline stage, where the policy's loss needs them.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from engine.dpo.objective import PairwiseObjective
from engine.model.lora import adapters_disabled
from engine.training.step import forward_only


class ReferencePolicy:
    def __init__(self, chunks: list[torch.nn.Module], objective: PairwiseObjective):
        self.chunks = chunks
        self.objective = objective

    @torch.no_grad()
    def logps(self, micro_batches: list, split: str | None = None) -> list[torch.Tensor | None]:
        """Per micro-batch a packed `SequenceLogps` on the last pipeline stage: a [2, rows] tensor
        (answer log-prob sum, answer token count), with a third row under --ld-alpha (the sum over
        the pair's shared length); None on other stages."""
        collected = forward_only(self.objective.reference_forward_step, [(b, None) for b in micro_batches],
                                 self.chunks, collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return list(collected)
        return [None] * len(micro_batches)


class AdapterOffReference(ReferencePolicy):
    """LoRA DPO's reference: the policy's own chunks with every adapter off, in eval mode.

    The base weights are frozen, so this is the initial policy without a second copy of
    them; the forward is the policy's code with the adapter branches skipped.
    """

    @torch.no_grad()
    def logps(self, micro_batches: list, split: str | None = None) -> list[torch.Tensor | None]:
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with adapters_disabled(self.chunks):
                return super().logps(micro_batches, split)
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)
