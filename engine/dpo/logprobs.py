"""Per-token log-probabilities from vocab-parallel logits, exact under tensor parallelism.

Each TP rank holds logits for a contiguous slice of the vocabulary. The log-softmax
needs a max all-reduce (stability), a sum-exp all-reduce (normalizer) and the target
logit, which lives on exactly one rank: it is gathered locally under an explicit
in-range mask (never `label != 0`, which silently drops token id 0) and summed over
the group. Columns added by vocab padding are excluded from the softmax, so the
result equals the unpadded HF model's log-probs.

Memory: the logits stay in the model's dtype (bf16 under --bf16: the trainer asks
Float16Module not to upcast them) and are processed in chunks of rows, each upcast
to fp32 on its own; backward recomputes the softmax chunk by chunk from the saved
logits. No full-vocab fp32 tensor of the micro-batch ever exists, only the logits
themselves, their gradient, and one fp32 chunk buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from engine.formats import IGNORE_INDEX

CHUNK_ELEMENTS = 1 << 24
"""fp32 elements per chunk (64 MiB): bounds the temporaries whatever the sequence length."""


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProbs(torch.autograd.Function):
    """Chunks of rows go through one reused fp32 buffer (the max needs no copy: it is exact in any
    dtype), so each chunk is copied once per pass and large temporaries are not re-allocated."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start: int, valid_columns: int, group, chunk_rows: int):
        rows = logits.reshape(-1, logits.shape[-1])
        local = labels.reshape(-1) - vocab_start
        in_range = (local >= 0) & (local < valid_columns)
        index = torch.where(in_range, local, torch.zeros_like(local))
        spans = [(s, min(s + chunk_rows, rows.shape[0])) for s in range(0, rows.shape[0], chunk_rows)]
        sum_exp = rows.new_zeros(rows.shape[0], dtype=torch.float32)
        target = torch.zeros_like(sum_exp)
        if valid_columns == 0:  # this rank's slice is all vocab padding
            row_max = torch.full_like(sum_exp, float("-inf"))
        else:
            row_max = torch.cat([rows[a:b, :valid_columns].amax(dim=-1) for a, b in spans]).float()
        row_max = _all_reduce(row_max, dist.ReduceOp.MAX, group)
        if valid_columns > 0:
            buffer = rows.new_empty((spans[0][1], valid_columns), dtype=torch.float32)
            for a, b in spans:
                x = buffer[:b - a].copy_(rows[a:b, :valid_columns]).sub_(row_max[a:b].unsqueeze(-1))
                target[a:b] = torch.where(in_range[a:b], x.gather(-1, index[a:b].unsqueeze(-1)).squeeze(-1), 0.0)
                sum_exp[a:b] = x.exp_().sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        _all_reduce(target, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(logits, index, in_range, row_max, sum_exp)
        ctx.valid_columns, ctx.spans = valid_columns, spans
        return (target - sum_exp.log()).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_output):
        # d logp(y) / d z_j = 1[j == y] - softmax_j; each rank owns its columns, padded ones get 0.
        logits, index, in_range, row_max, sum_exp = ctx.saved_tensors
        rows, valid = logits.reshape(-1, logits.shape[-1]), ctx.valid_columns
        go = grad_output.reshape(-1).float()
        grad = torch.empty_like(rows) if valid == rows.shape[1] else torch.zeros_like(rows)
        # fp32 logits: work in the gradient itself; otherwise in one fp32 buffer, then cast into it.
        buffer = None if rows.dtype == torch.float32 or valid == 0 else \
            rows.new_empty((ctx.spans[0][1], valid), dtype=torch.float32)
        for a, b in ctx.spans if valid > 0 else ():
            x = grad[a:b, :valid] if buffer is None else buffer[:b - a]
            x.copy_(rows[a:b, :valid]).sub_(row_max[a:b].unsqueeze(-1)).exp_()
            x.mul_((-go[a:b] / sum_exp[a:b]).unsqueeze(-1))
            x.scatter_add_(-1, index[a:b].unsqueeze(-1), (go[a:b] * in_range[a:b]).unsqueeze(-1))
            if buffer is not None:
                grad[a:b, :valid] = x
        return grad.view(logits.shape), None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                            chunk_rows: int | None = None) -> torch.Tensor:
    """log p(labels[b, t] | context) for logits [b, s, vocab/TP]; 0 where labels == IGNORE_INDEX.

    `vocab_size` is the tokenizer's (unpadded) size: padded columns never take probability mass.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    local_columns = logits.shape[-1]
    vocab_start = rank * local_columns
    valid_columns = max(0, min(local_columns, vocab_size - vocab_start))
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // local_columns)
    token_logps = _VocabParallelLogProbs.apply(logits, labels, vocab_start, valid_columns, group, chunk_rows)
    return token_logps * (labels != IGNORE_INDEX)


@torch.no_grad()
def vocab_parallel_mean_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean logit over the real vocabulary for each position [b, s] (TRL's logits/* metrics)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    local_columns = logits.shape[-1]
    valid_columns = max(0, min(local_columns, vocab_size - rank * local_columns))
    total = logits[..., :valid_columns].sum(dim=-1, dtype=torch.float32)  # fp32 accumulation, no fp32 copy
    return _all_reduce(total, dist.ReduceOp.SUM, parallel_state.get_tensor_model_parallel_group()) / vocab_size
