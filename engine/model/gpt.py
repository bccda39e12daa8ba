"""megatron-core's GPTModel with an output layer that runs on chosen positions only, and RoPE from position ids.

Preference losses read the logits of the answer tokens; the prompt positions (often as many)
carry no target, yet megatron's GPTModel computes [positions, vocab] logits for all of them,
the largest matmul of a small model's step and its largest activation. `forward(...,
output_rows=index)` selects rows of the last hidden states before the output layer, so the
logits (and their gradient, and the log-prob kernel after them) cover those positions only.

The selection happens in `_postprocess`, between the decoder and megatron's own output layer,
which stays untouched (tied embeddings, sequence-parallel all-gather, gradient-accumulation
fusion). Under sequence parallelism each TP rank selects from its own slice of the sequence,
equally many rows on every rank, and the output layer's all-gather joins them.

megatron's rotary embedding ignores `position_ids`: it rotates position s of each row by s, or, in a THD row,
by the offset within each `cu_seqlens` segment. Under --shared-prompt a pair's rejected part continues from the
end of the shared prompt, not from the chosen part's end: `forward(..., rope_from_position_ids=True)` rotates
each token by its own position id, through megatron's own RoPE functions (a per-token angle table: the exact
per-position mapping of its THD path; broadcast over the batch in the sbhd path).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region


class _SelectRows(torch.autograd.Function):
    """`hidden.flatten(0, 1)[index]` as [M, 1, h]; the backward adds each gradient row to its position. A position
    is selected for at most two targets (under --shared-prompt, the prefix's last position predicts both answers'
    first token), and two additions onto zero give the same bits in either order; padding rows add exact zeros:
    deterministic on CUDA too."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = hidden.shape
        return hidden.flatten(0, 1).index_select(0, index).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        s, b, h = ctx.shape
        full = grad.new_zeros(s * b, h).index_put_((index,), grad.squeeze(1), accumulate=True)
        return full.view(s, b, h), None


class PreferenceGPTModel(GPTModel):
    """GPTModel whose forward takes `output_rows`: int64 [M] rows of this rank's flattened [s * b, h] last hidden
    states (position t of row r is t * b + r). With it, the last stage returns logits [1, M x (TP under sequence
    parallelism), vocab / TP] for those rows in that order (all TP ranks' rows, rank by rank); without it, the
    usual [b, s, vocab / TP]. With `rope_from_position_ids`, RoPE rotates each token by its position id."""

    _output_rows: torch.Tensor | None = None
    _rope_positions: torch.Tensor | None = None

    def forward(self, input_ids, position_ids, *args, output_rows: torch.Tensor | None = None,
                rope_from_position_ids: bool = False, **kwargs):
        self._output_rows = output_rows
        self._rope_positions = position_ids if rope_from_position_ids else None
        try:
            return super().forward(input_ids, position_ids, *args, **kwargs)
        finally:
            self._output_rows = self._rope_positions = None

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        if self._rope_positions is None or out[1] is None:
            return out
        if self.config.apply_rope_fusion:
            raise NotImplementedError("rope_from_position_ids needs megatron's unfused RoPE (apply_rope_fusion off)")
        positions = self._rope_positions  # [b, s]
        table = self.rotary_pos_emb.get_emb(positions.shape[1])  # [s, 1, 1, dim]: angles of positions 0..s-1
        if positions.shape[0] == 1:  # THD: one angle row per token, megatron's exact per-position mapping
            emb = table[positions[0]]
        else:  # sbhd: [s, b, 1, dim], broadcast against [s, b, heads, dim]
            emb = table[positions.t()].squeeze(-2)
        return (out[0], emb, *out[2:])

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.post_process and self._output_rows is not None:
            if self.config.mtp_num_layers is not None:
                raise NotImplementedError("output_rows with multi-token prediction")
            hidden_states = _SelectRows.apply(hidden_states, self._output_rows)
        return super()._postprocess(hidden_states, *args, **kwargs)


def routing_padding_mask(chunk: GPTModel, padding: torch.Tensor | None) -> dict:
    """The `padding_mask` keyword of an MoE chunk's forward (none for a dense model or a batch without padding):
    megatron-core 0.16.1's routers leave the True positions out of the load-balancing statistics (the tokens per
    expert and the mean routing probabilities) and the engine's router (engine.model.router) out of the z-loss's
    mean over the sequence, so the router losses are those of the real tokens, packed or padded. The positions
    are still routed (their outputs are never read).

    megatron splits the mask over sequence parallelism only on the first pipeline stage; a later stage's chunk
    gets its share here, as megatron cuts its hidden states ([s / TP, b])."""
    if padding is None or chunk.config.num_moe_experts is None:
        return {}
    if not chunk.pre_process and chunk.config.sequence_parallel:
        padding = scatter_to_sequence_parallel_region(padding.t().contiguous()).t().contiguous()
    return {"padding_mask": padding}
