"""The reward model: megatron-core's GPTModel with a scalar value head in place of the vocab projection.

GPTModel builds its output layer in its constructor and calls it from `_postprocess`; a reward model
keeps the decoder (final norm included) and replaces that one step (`_postprocess`, called with keyword
arguments from `forward`: read in megatron-core 0.16.1 and in Megatron-LM main). The head is a [1, hidden] weight,
replicated over tensor-parallel ranks: every TP rank holds the full hidden state after the decoder's
row-parallel reductions, so each computes the same rewards and the same head gradient, and nothing
needs a TP collective except, under sequence parallelism, gathering the sequence shards first (whose
backward hands each rank its own slice of the already-complete gradient: no reduction). It lives on
the last pipeline stage only and is saved as `value_head.weight` (engine/formats.py VALUE_HEAD_KEY).

The head starts from N(0, --init-method-std) drawn from a generator seeded with --seed, the same on
every rank and layout, like HF's `*ForSequenceClassification.score` init; a checkpoint that has one
(a trained RM, or an HF classifier converted with num_labels=1) overrides it.
The transient cost: GPTModel allocates its vocab projection before it is dropped (vocab/TP x hidden on
the last stage during construction only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig


class ValueHead(torch.nn.Module):
    """hidden [s, b, h] (sequence-sharded under sequence parallel) -> one value per position, [b, s]."""

    def __init__(self, config: TransformerConfig, seed: int):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        weight = torch.empty(1, config.hidden_size, dtype=torch.float32)
        weight.normal_(0.0, config.init_method_std, generator=torch.Generator().manual_seed(seed))
        self.weight = torch.nn.Parameter(weight.to(config.params_dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight).squeeze(-1).transpose(0, 1)


class RewardGPTModel(GPTModel):
    """GPTModel ending in `ValueHead`: forward returns per-position values [b, s] on the last stage."""

    def __init__(self, *args, head_seed: int, **kwargs):
        super().__init__(*args, share_embeddings_and_output_weights=False, **kwargs)
        if self.post_process:
            del self.output_layer  # the vocab projection: a reward model has none
            self.value_head = ValueHead(self.config, head_seed)

    def _postprocess(self, hidden_states: torch.Tensor, **_) -> torch.Tensor:
        if not self.post_process:
            return hidden_states
        return self.value_head(hidden_states)
