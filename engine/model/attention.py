"""Core attention through torch scaled_dot_product_attention.

Without transformer-engine, megatron's local DotProductAttention materializes the
full [b, heads, s, s] score matrix in Python-level ops. SDPA dispatches to flash /
memory-efficient kernels on CUDA (and a fused kernel on CPU), with GQA handled
natively, so GPUs without TE still get flash attention.

Packed micro-batches arrive in megatron's THD layout (``packed_seq_params`` with
``qkv_format='thd'``: q, k, v are [t, heads, hn], sequences delimited by
``cu_seqlens_q``): each sequence gets its own causal attention, so no [t, t] mask
is built and no score is computed across sequences. The split needs the lengths on the host:
``HostPackedSeqParams`` brings them from the collate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


@dataclass
class HostPackedSeqParams(PackedSeqParams):
    """megatron's THD parameters plus the sequences' lengths on the host.

    megatron keeps `cu_seqlens` on the device, where TE's kernels read them; SDPAttention splits q, k and v
    into sequences on the host, and reading the lengths back from the device would wait for the GPU in every
    layer. The collate knows them, so they travel here (megatron hands this same object to every layer's core
    attention; TE reads only its own fields).
    """

    seq_lengths: tuple[int, ...] | None = None
    """Length of each segment of the row, in order (cu_seqlens' differences)."""
    pair_layouts: tuple[tuple[int, int, int], ...] | None = None
    """--shared-prompt: per pair (shared prefix P, chosen part C, rejected part R), pair i being segment i of a
    THD row (the padding tail follows) or row i of an 'sbhd' batch: the rejected part attends to the prefix and
    to itself, never to the chosen part (`SDPAttention._attend_pair`)."""


class SDPAttention(MegatronModule):
    """Drop-in core_attention for megatron's SelfAttention: [sq, b, np, hn] in, [sq, b, hp] out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs transformer-engine attention")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention takes no attention_bias")
        mask_type = attn_mask_type or self.attn_mask_type
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, mask_type, packed_seq_params, dropout_p)
        return self._attend(query, key, value, attention_mask, mask_type, packed_seq_params, dropout_p)

    def _attend(self, query, key, value, attention_mask, mask_type, packed_seq_params, dropout_p):
        if getattr(packed_seq_params, "pair_layouts", None) is not None:
            return self._attend_shared(query, key, value, packed_seq_params, dropout_p)
        if packed_seq_params is not None:
            return self._attend_packed(query, key, value, packed_seq_params, dropout_p)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        # megatron masks are True where attention is NOT allowed; SDPA's bool masks are the opposite.
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        attn_mask = None if attention_mask is None else ~attention_mask
        context = self._sdpa(q, k, v, attn_mask, causal, dropout_p)
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _attend_packed(self, query, key, value, packed_seq_params, dropout_p):
        """THD: [t, heads, hn] in, [t, heads * hn] out; causal attention within each sequence."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"SDPAttention packs only the thd format, got {packed_seq_params.qkv_format!r}")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise NotImplementedError("SDPAttention packs self-attention only (cu_seqlens_q == cu_seqlens_kv)")
        lengths = getattr(packed_seq_params, "seq_lengths", None)
        if lengths is None:  # megatron's own PackedSeqParams: one device-to-host read per layer
            lengths = cu_q.diff().tolist()
        pieces = zip(*(t.split(lengths) for t in (query, key, value)))
        context = [self._sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in qkv), None, True, dropout_p)
                   for qkv in pieces]  # each [1, heads, s_i, hn]
        return torch.cat([c.squeeze(0).transpose(0, 1) for c in context]).flatten(1)

    def _attend_shared(self, query, key, value, params, dropout_p):
        """--shared-prompt: THD ([t, heads, hn], pair i is segment i, then the padding tail) or 'sbhd' ([s, b,
        heads, hn], pair i is row i); [t, heads * hn] or [s, b, heads * hn] out."""
        layouts = params.pair_layouts
        if params.qkv_format == "thd":
            pieces = zip(*(t.split(list(params.seq_lengths)) for t in (query, key, value)))
            return torch.cat([self._attend_pair(q, k, v, layouts[i] if i < len(layouts) else None, dropout_p)
                              for i, (q, k, v) in enumerate(pieces)]).flatten(1)
        if params.qkv_format != "sbhd":
            raise NotImplementedError(f"--shared-prompt attention takes thd or sbhd, got {params.qkv_format!r}")
        rows = [self._attend_pair(query[:, i], key[:, i], value[:, i], layouts[i], dropout_p)
                for i in range(query.shape[1])]
        return torch.stack(rows, dim=1).flatten(2)

    def _attend_pair(self, q, k, v, layout: tuple[int, int, int] | None, dropout_p: float) -> torch.Tensor:
        """One [prefix | chosen | rejected] sequence, [s, heads, hn] in and out: the prefix and the chosen part
        causal as one sequence; the rejected part over the prefix's keys and its own, causal among its own
        (a [R, P + R] mask, the size of the rejected sequence's own attention); anything after (padding) on
        its own. Each query sees exactly the keys it sees in its own sequence: two SDPA calls, no [s, s] mask."""
        def attend(q, k, v, mask=None):
            out = self._sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), mask, mask is None, dropout_p)
            return out.squeeze(0).transpose(0, 1)

        if layout is None:
            return attend(q, k, v)
        prefix, chosen, rejected = layout
        split, end = prefix + chosen, prefix + chosen + rejected
        parts = [attend(q[:split], k[:split], v[:split])]
        if rejected:
            mask = torch.ones(rejected, prefix + rejected, dtype=torch.bool, device=q.device).tril_(prefix)
            parts.append(attend(q[split:end], torch.cat([k[:prefix], k[split:end]]),
                                torch.cat([v[:prefix], v[split:end]]), mask))
        if end < q.shape[0]:
            parts.append(attend(q[end:], k[end:], v[end:]))
        return torch.cat(parts)

    def _sdpa(self, q, k, v, attn_mask, causal: bool, dropout_p: float) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )
