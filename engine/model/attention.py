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

--shared-prompt rows ([prompt | chosen | rejected] per pair) attend in one of two exact ways. On CUDA in fp16/bf16
without dropout, one flash `varlen_attn` call per layer for the whole micro-batch: the chosen sequences and the
rejected ones are all causal segments of one call, the rejected keys gathered as [prompt; rejected] with the causal
mask aligned to the bottom right (`_attend_shared_varlen`). Elsewhere, two SDPA calls per pair (`_attend_pair`):
on CPU the rejected part takes a [R, P + R] boolean mask (measured as fast as a `CausalBias` there, which
materializes that same mask, and without its fallback warnings); on CUDA a lower-right `CausalBias`, which SDPA
runs in its flash or memory-efficient kernel where a boolean mask would force the math one.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from torch.nn.attention.bias import causal_lower_right
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
        if params.qkv_format not in ("thd", "sbhd"):
            raise NotImplementedError(f"--shared-prompt attention takes thd or sbhd, got {params.qkv_format!r}")
        if _fused_varlen_fits(query, dropout_p, self.softmax_scale):
            return self._attend_shared_varlen(query, key, value, params, _flash_varlen)
        if query.is_cuda and key.shape[-2] != query.shape[-2]:
            # SDPA's memory-efficient kernel (fp32, or dropout) takes no GQA: it would fall back to the math one.
            group = query.shape[-2] // key.shape[-2]
            key, value = (t.repeat_interleave(group, dim=-2) for t in (key, value))
        layouts = params.pair_layouts
        if params.qkv_format == "thd":
            pieces = zip(*(t.split(list(params.seq_lengths)) for t in (query, key, value)))
            return torch.cat([self._attend_pair(q, k, v, layouts[i] if i < len(layouts) else None, dropout_p)
                              for i, (q, k, v) in enumerate(pieces)]).flatten(1)
        rows = [self._attend_pair(query[:, i], key[:, i], value[:, i], layouts[i], dropout_p)
                for i in range(query.shape[1])]
        return torch.stack(rows, dim=1).flatten(2)

    def _attend_pair(self, q, k, v, layout: tuple[int, int, int] | None, dropout_p: float) -> torch.Tensor:
        """One [prefix | chosen | rejected] sequence, [s, heads, hn] in and out: the prefix and the chosen part
        causal as one sequence; the rejected part over the prefix's keys and its own, causal among its own
        (a [R, P + R] mask aligned to the bottom right, the size of the rejected sequence's own attention); anything
        after (padding) on its own. Each query sees exactly the keys it sees in its own sequence: two SDPA calls, no
        [s, s] mask."""
        def attend(q, k, v, mask=None):
            out = self._sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), mask, mask is None, dropout_p)
            return out.squeeze(0).transpose(0, 1)

        if layout is None:
            return attend(q, k, v)
        prefix, chosen, rejected = layout
        split, end = prefix + chosen, prefix + chosen + rejected
        parts = [attend(q[:split], k[:split], v[:split])]
        if rejected:
            if q.is_cuda:
                mask = causal_lower_right(rejected, prefix + rejected)
            else:
                mask = torch.ones(rejected, prefix + rejected, dtype=torch.bool, device=q.device).tril_(prefix)
            parts.append(attend(q[split:end], torch.cat([k[:prefix], k[split:end]]),
                                torch.cat([v[:prefix], v[split:end]]), mask))
        if end < q.shape[0]:
            parts.append(attend(q[end:], k[end:], v[end:]))
        return torch.cat(parts)

    def _attend_shared_varlen(self, query, key, value, params, kernel) -> torch.Tensor:
        """--shared-prompt as one variable-length call over the micro-batch: the queries stay in place (each pair's
        prefix + chosen part, its rejected part and any padding tail are consecutive segments), the keys and values
        are gathered per segment (the rejected part's: [prefix; rejected]), and every segment is causal aligned to
        the bottom right, which for the rejected part is "query i sees the prefix and rejected keys up to i".
        `kernel(q, k, v, plan, scale)` runs such a call: `_flash_varlen` on CUDA."""
        layouts = params.pair_layouts
        if params.qkv_format == "thd":
            blocks = tuple((length, layouts[i] if i < len(layouts) else None)
                           for i, length in enumerate(params.seq_lengths))
            q, k, v = query, key, value
        else:  # 'sbhd': each row one block, row-major into one token dimension
            s, b = query.shape[:2]
            blocks = tuple((s, layout) for layout in layouts)
            q, k, v = (t.transpose(0, 1).reshape(b * s, *t.shape[2:]) for t in (query, key, value))
        plan = _varlen_plan(blocks, q.device)
        out = kernel(q, k.index_select(0, plan.keys), v.index_select(0, plan.keys), plan, self.softmax_scale)
        if params.qkv_format == "thd":
            return out.flatten(1)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _sdpa(self, q, k, v, attn_mask, causal: bool, dropout_p: float) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
        )


@dataclass(frozen=True)
class VarlenPlan:
    """One --shared-prompt micro-batch as variable-length attention segments (all causal, bottom-right aligned)."""

    cu_q: torch.Tensor
    """int32 [segments + 1]: where each segment's queries start in the token dimension."""
    cu_k: torch.Tensor
    """int32 [segments + 1]: where each segment's keys start among the gathered keys."""
    keys: torch.Tensor
    """int64: the token of each gathered key and value, segment after segment."""
    max_q: int
    max_k: int


@functools.lru_cache(maxsize=16)
def _varlen_plan(blocks: tuple[tuple[int, tuple[int, int, int] | None], ...], device: torch.device) -> VarlenPlan:
    """The segments of consecutive blocks (length, pair layout or None): a pair's block holds the segments
    prefix + chosen (keys: themselves) and rejected (keys: prefix, then rejected), then any tail of the block on its
    own; a block without a layout is one segment. Cached: every layer of a micro-batch gets the same plan."""
    q_lengths, k_lengths, keys = [], [], []

    def segment(queries: int, *key_ranges: tuple[int, int]):
        if queries:
            q_lengths.append(queries)
            k_lengths.append(sum(stop - start for start, stop in key_ranges))
            keys.extend(torch.arange(start, stop) for start, stop in key_ranges)

    start = 0
    for length, layout in blocks:
        tail = start
        if layout is not None:
            prefix, chosen, rejected = layout
            split = start + prefix + chosen
            tail = split + rejected
            segment(prefix + chosen, (start, split))
            segment(rejected, (start, start + prefix), (split, tail))
        segment(start + length - tail, (tail, start + length))
        start += length

    def offsets(lengths):
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return VarlenPlan(cu_q=offsets(q_lengths), cu_k=offsets(k_lengths), keys=torch.cat(keys).to(device),
                      max_q=max(q_lengths), max_k=max(k_lengths))


@functools.cache
def _varlen_parameters() -> frozenset[str] | None:
    """The keyword parameters of torch's `varlen_attn` (torch >= 2.10), which changed across versions: 2.10 takes
    is_causal and no scale, 2.11 window_size and scale, 2.12 adds enable_gqa; None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _fused_varlen_fits(query: torch.Tensor, dropout_p: float, scale: float) -> bool:
    """Whether `_flash_varlen` runs this call: flash kernels take fp16/bf16 and head sizes up to 256 in steps of 8;
    varlen_attn has no dropout; without a scale parameter (torch 2.10) the default 1 / sqrt(hn) must be ours."""
    parameters = _varlen_parameters()
    head = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
            and parameters is not None and head % 8 == 0 and head <= 256
            and ("scale" in parameters or math.isclose(scale, 1.0 / math.sqrt(head))))


def _flash_varlen(q, k, v, plan: VarlenPlan, scale: float) -> torch.Tensor:
    """torch's flash `varlen_attn`, causal (flash aligns it to the bottom right when a segment has more keys than
    queries), in the spelling of the installed torch; KV heads repeated where it takes no enable_gqa."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = _varlen_parameters()
    kwargs = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "scale" in parameters:
        kwargs["scale"] = scale
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return varlen_attn(q.contiguous(), k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, **kwargs)
