"""megatron-core's MoE router with its z-loss taken over the whole sequence: the same loss in every parallel layout.

megatron-core (0.16.1 to 0.19.0, `TopKRouter.apply_z_loss`) takes each sequence-parallel rank's mean of
logsumexp(logits)^2 over its own real tokens, with the coefficient divided by the TP x CP size: a mean of
per-rank means. Padding sits at the rows' ends, in the last rank's share, so that is not the mean over the
micro-batch's real tokens, and a TP run's z-loss and its gradient differ from one rank's. Here each rank
takes the sum over its real tokens divided by the real-token count of the whole TP x CP group, so the sum of
the ranks' losses is the one-rank mean: the router's weight gradient is that sum (megatron all-reduces it over
TP, the weight being marked sequence-parallel) and the logged value is that sum (the tracker's reduce group).

This is a correctness fix on every device, not a CPU bridge: it is listed in
`engine.model.compat.MEGATRON_CORE_CORRECTIONS` and built into every MoE layer through the layer spec
(`MoESubmodules.router`), never patched into megatron.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter


class SequenceZLossRouter(TopKRouter):
    """TopKRouter whose z-loss is the mean over the real tokens of the sequence, whatever the TP/SP/CP split."""

    def apply_z_loss(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attaches coeff x (this rank's sum of logsumexp^2 over its real tokens) / (the group's real tokens).

        `padding_mask` ([tokens], True on padding) is megatron's. Without one every rank of the group holds
        equally many tokens (megatron splits the sequence evenly), so the count needs no communication; with
        one, the ranks' counts are summed (one scalar all-reduce per MoE layer, only when the group has
        several ranks). Skipped, as megatron skips it, under no_grad and in eval mode (reference passes).

        Under calculate_per_token_loss megatron divides every gradient by the global token count, so the
        attached loss is multiplied by the group's count (the group then attaches coeff x the micro-batch's sum,
        megatron-core 0.19's scaling); the engine itself turns it off for its routers
        (`count_router_losses_per_micro_batch`).
        """
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        group = self.tp_cp_group
        squares = torch.square(torch.logsumexp(logits, dim=-1))
        if padding_mask is None:
            total = squares.sum()
            count = torch.tensor(float(logits.shape[0] * group.size()), device=logits.device)
        else:
            valid = ~padding_mask
            total = (squares * valid).sum()
            count = valid.sum()
            if group.size() > 1:
                torch.distributed.all_reduce(count, group=group)
        count = torch.clamp(count, min=1)
        z_loss = total / count * coeff
        attached = z_loss * count if self.calculate_per_token_loss else z_loss
        logits = MoEAuxLossAutoScaler.apply(logits, attached)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number, num_layers, reduce_group=group)
        return logits
