"""RMSNorm / LayerNorm for the local spec, with sequence-parallel support.

megatron-core's torch norm wrapper refuses sequence parallelism, because under SP
each TP rank normalizes a different slice of tokens, so norm weight grads are
partial sums. Marking the params `sequence_parallel` makes megatron's
finalize_model_grads all-reduce them over the TP group. The math follows HF
(statistics in fp32, cast back before the weight multiply), so converted
checkpoints reproduce transformers' logits in bf16 too.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class Norm(torch.nn.Module):
    """`config.normalization` (RMSNorm or LayerNorm) over the last dim of size `hidden_size`."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.rms:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        return (self.weight * x.to(dtype)) + self.bias
