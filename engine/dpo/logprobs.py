"""Per-token log-probabilities from vocab-parallel logits, exact under tensor parallelism.

Each TP rank holds logits for a contiguous slice of the vocabulary. The log-softmax
needs a max all-reduce (stability), a sum-exp all-reduce (normalizer) and the target
logit, which lives on exactly one rank: it is gathered locally under an explicit
in-range mask (never `label != 0`, which silently drops token id 0) and summed over
the group. Columns added by vocab padding are excluded from the softmax, so the
result equals the unpadded HF model's log-probs.

The autograd Function keeps one fp32 copy of the local logits (turned into the
softmax for backward) instead of the several temporaries a composed expression
would hold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

IGNORE_INDEX = -100


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, valid_columns: int, group):
        probs = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
        if valid_columns < probs.shape[-1]:
            probs[..., valid_columns:] = float("-inf")
        row_max = _all_reduce(probs.max(dim=-1).values, dist.ReduceOp.MAX, group)
        probs.sub_(row_max.unsqueeze(-1))

        local = labels - vocab_start
        in_range = (local >= 0) & (local < valid_columns)
        index = torch.where(in_range, local, torch.zeros_like(local)).unsqueeze(-1)
        target = torch.where(in_range, probs.gather(-1, index).squeeze(-1), 0.0)
        target = _all_reduce(target, dist.ReduceOp.SUM, group)

        probs.exp_()
        sum_exp = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group)
        probs.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(probs, index, in_range)
        return target - sum_exp.log()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # d logp(y) / d z_j = 1[j == y] - softmax_j; each rank owns its columns.
        probs, index, in_range = ctx.saved_tensors
        grad = probs.mul_(-grad_output.unsqueeze(-1))
        grad.scatter_add_(-1, index, (grad_output * in_range).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(labels[b, t] | context) for logits [b, s, vocab/TP]; 0 where labels == IGNORE_INDEX.

    `vocab_size` is the tokenizer's (unpadded) size: padded columns never take probability mass.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    local_columns = logits.shape[-1]
    vocab_start = rank * local_columns
    valid_columns = max(0, min(local_columns, vocab_size - vocab_start))
    token_logps = _VocabParallelLogProbs.apply(logits, labels, vocab_start, valid_columns, group)
    return token_logps * (labels != IGNORE_INDEX)


@torch.no_grad()
def vocab_parallel_mean_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean logit over the real vocabulary for each position [b, s] (TRL's logits/* metrics)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    local_columns = logits.shape[-1]
    valid_columns = max(0, min(local_columns, vocab_size - rank * local_columns))
    total = logits[..., :valid_columns].float().sum(dim=-1)
    return _all_reduce(total, dist.ReduceOp.SUM, parallel_state.get_tensor_model_parallel_group()) / vocab_size
