"""--shared-prompt attention (engine/model/attention.py) on CPU: the per-pair SDPA path and the one-call varlen path
against two separate sequences per pair, forward and backward, packed (THD) and padded ('sbhd'), with GQA.

The varlen path runs here with `reference_varlen`, a per-segment SDPA written from varlen_attn's documented
semantics (segments delimited by cu_seq_q / cu_seq_k, causal aligned to the bottom right): it checks the segments,
the key gather and the layouts that `_attend_shared_varlen` builds. torch's flash `varlen_attn` itself has no CPU
kernel; tests/cuda/test_shared_attention.py runs the same comparisons with it on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from engine.model.attention import HostPackedSeqParams, SDPAttention, _fused_varlen_fits, _varlen_plan

HEADS, GROUPS, HEAD_DIM = 4, 2, 8
PAIRS = ((3, 4, 5), (6, 2, 1), (2, 5, 0), (5, 1, 4))  # (prefix, chosen, rejected): a pair without a rejected tail too


def attention() -> SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0)
    return SDPAttention(config, 1, AttnMaskType.causal, "self")


def reference_varlen(q, k, v, plan, scale):
    """varlen_attn's semantics, one segment at a time: query i of a segment of Q queries and K keys sees keys
    j <= i + K - Q of its own segment."""
    out = []
    cu_q, cu_k = plan.cu_q.tolist(), plan.cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril_(k1 - k0 - (q1 - q0))
        seg = [t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        out.append(torch.nn.functional.scaled_dot_product_attention(*seg, attn_mask=mask, scale=scale,
                                                                     enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


def separate(q, k, v, blocks, scale):
    """Each pair as its two sequences, [prefix | chosen] and [prefix | rejected], causal; a block's tail (padding)
    causal on its own. q, k, v: [t, heads, hn] with the blocks laid end to end; the outputs in the same layout (a
    rejected sequence's prefix outputs are the chosen one's)."""
    def causal(positions):
        seg = [t[positions].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        return torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=scale,
                                                                enable_gqa=True)[0].transpose(0, 1)

    out, start = [], 0
    for length, layout in blocks:
        prefix, chosen, rejected = layout or (0, 0, 0)
        split, end = start + prefix + chosen, start + prefix + chosen + rejected
        if layout:
            out.append(causal(torch.arange(start, split)))
            if rejected:
                out.append(causal(torch.cat([torch.arange(start, start + prefix), torch.arange(split, end)]))[prefix:])
        if end < start + length:
            out.append(causal(torch.arange(end, start + length)))
        start += length
    return torch.cat(out)


def inputs(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, HEADS, HEAD_DIM, generator=g), torch.randn(tokens, GROUPS, HEAD_DIM, generator=g),
            torch.randn(tokens, GROUPS, HEAD_DIM, generator=g), torch.randn(tokens, HEADS * HEAD_DIM, generator=g))


def with_grads(fn, q, k, v, weight):
    """fn's output and the gradients of sum(weight * output) by q, k and v."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out.flatten(1) * weight).sum().backward()
    return [out.flatten(1).detach()] + [t.grad for t in leaves]


def assert_close(ours, theirs):
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, theirs):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5, name


def test_the_plan_names_each_segment_and_its_keys():
    """Pair (3, 4, 5) in a block of 12, pair (2, 1, 2) in a block of 6 (one padding token after it), a block of 4
    without a pair."""
    plan = _varlen_plan(((12, (3, 4, 5)), (6, (2, 1, 2)), (4, None)), torch.device("cpu"))
    assert plan.cu_q.tolist() == [0, 7, 12, 15, 17, 18, 22]  # 3+4 | 5 | 2+1 | 2 | 1 | 4
    assert plan.cu_k.tolist() == [0, 7, 15, 18, 22, 23, 27]  # 7 | 3+5 | 3 | 2+2 | 1 | 4
    assert plan.keys.tolist() == [*range(7), 0, 1, 2, *range(7, 12), 12, 13, 14, 12, 13, 15, 16, 17, 18, 19, 20, 21]
    assert (plan.max_q, plan.max_k) == (7, 8)
    assert plan.cu_q.dtype == plan.cu_k.dtype == torch.int32


def test_the_flash_call_is_for_cuda_half_precision_without_dropout():
    q = torch.zeros(4, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    assert not _fused_varlen_fits(q, 0.0, HEAD_DIM ** -0.5)  # CPU: the per-pair SDPA path


@pytest.mark.parametrize("packed", [True, False], ids=["thd", "sbhd"])
def test_both_paths_give_the_two_separate_sequences_forward_and_backward(packed):
    core = attention()
    lengths = [sum(pair) for pair in PAIRS]
    if packed:  # one row: the pairs end to end, then a padding segment of 3
        blocks = tuple(zip(lengths, PAIRS)) + ((3, None),)
        params = HostPackedSeqParams(qkv_format="thd", seq_lengths=tuple(length for length, _ in blocks),
                                     pair_layouts=PAIRS)
        to_core = to_row = lambda t: t  # noqa: E731
    else:  # a row per pair, padded to the longest
        s, b = max(lengths), len(PAIRS)
        blocks = tuple((s, pair) for pair in PAIRS)
        params = HostPackedSeqParams(qkv_format="sbhd", pair_layouts=PAIRS)

        def to_core(t):  # [b * s, ...] row-major -> [s, b, ...]
            return t.reshape(b, s, *t.shape[1:]).transpose(0, 1)

        def to_row(t):  # [s, b, ...] -> [b * s, ...]
            return t.transpose(0, 1).reshape(b * s, *t.shape[2:])

    q, k, v, weight = inputs(sum(length for length, _ in blocks))
    expected = with_grads(lambda q, k, v: separate(q, k, v, blocks, core.softmax_scale), q, k, v, weight)

    def sdpa_path(q, k, v):
        return to_row(core(to_core(q), to_core(k), to_core(v), None, packed_seq_params=params))

    def varlen_path(q, k, v):
        return to_row(core._attend_shared_varlen(to_core(q), to_core(k), to_core(v), params, reference_varlen))

    per_pair, varlen = with_grads(sdpa_path, q, k, v, weight), with_grads(varlen_path, q, k, v, weight)
    assert_close(per_pair, expected)
    assert_close(varlen, expected)
    assert_close(varlen, per_pair)
