"""megatron-core's GPTModel with an output layer that runs on chosen positions only.

Preference losses read the logits of the answer tokens; the prompt positions (often as many)
carry no target, yet megatron's GPTModel computes [positions, vocab] logits for all of them,
the largest matmul of a small model's step and its largest activation. `forward(...,
output_rows=index)` selects rows of the last hidden states before the output layer, so the
logits (and their gradient, and the log-prob kernel after them) cover those positions only.

The selection happens in `_postprocess`, between the decoder and megatron's own output layer,
which stays untouched (tied embeddings, sequence-parallel all-gather, gradient-accumulation
fusion). Under sequence parallelism each TP rank selects from its own slice of the sequence,
equally many rows on every rank, and the output layer's all-gather joins them.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class _SelectRows(torch.autograd.Function):
    """`hidden.flatten(0, 1)[index]` as [M, 1, h]; the backward writes each gradient row to its position
    (the rows are distinct: no accumulating scatter, deterministic on CUDA too)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = hidden.shape
        return hidden.flatten(0, 1).index_select(0, index).unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        s, b, h = ctx.shape
        full = grad.new_zeros(s * b, h).index_put_((index,), grad.squeeze(1))
        return full.view(s, b, h), None


class OutputRowsGPTModel(GPTModel):
    """GPTModel whose forward takes `output_rows`: int64 [M] rows of this rank's flattened [s * b, h] last hidden
    states (position t of row r is t * b + r). With it, the last stage returns logits [1, M x (TP under sequence
    parallelism), vocab / TP] for those rows in that order (all TP ranks' rows, rank by rank); without it, the
    usual [b, s, vocab / TP]."""

    _output_rows: torch.Tensor | None = None

    def forward(self, *args, output_rows: torch.Tensor | None = None, **kwargs):
        self._output_rows = output_rows
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._output_rows = None

    def _postprocess(self, hidden_states, *args, **kwargs):
        if self.post_process and self._output_rows is not None:
            if self.config.mtp_num_layers is not None:
                raise NotImplementedError("output_rows with multi-token prediction")
            hidden_states = _SelectRows.apply(hidden_states, self._output_rows)
        return super()._postprocess(hidden_states, *args, **kwargs)
