"""--shared-prompt attention on a CUDA GPU: the kernels engine/model/attention.py picks there, checked against two
separate sequences per pair (tests/unit/model/test_shared_attention.py runs the same comparisons on CPU).

bf16: one flash `varlen_attn` call per layer (torch >= 2.10); fp32: per pair, a lower-right `CausalBias` that SDPA
runs in a fused kernel. The profiler shows which aten kernels ran: never SDPA's math fallback. Skipped without
CUDA (tests/cuda/conftest.py). Not yet run on a GPU: README "GPU" says what was.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from engine.model.attention import HostPackedSeqParams, _fused_varlen_fits, _varlen_parameters
from tests.unit.model.test_shared_attention import PAIRS, attention, inputs, separate, with_grads

MATH = "aten::_scaled_dot_product_attention_math"


def run_thd(dtype: torch.dtype):
    """One packed row of PAIRS (and a padding segment) on the GPU in `dtype`: (the outputs and gradients as fp32
    on CPU, those of two separate sequences in fp32 on CPU, the aten ops that ran)."""
    core = attention()
    blocks = tuple(zip((sum(pair) for pair in PAIRS), PAIRS)) + ((3, None),)
    params = HostPackedSeqParams(qkv_format="thd", seq_lengths=tuple(length for length, _ in blocks),
                                 pair_layouts=PAIRS)
    q, k, v, weight = inputs(sum(length for length, _ in blocks))
    expected = with_grads(lambda q, k, v: separate(q, k, v, blocks, core.softmax_scale), q, k, v, weight)
    on_gpu = [t.cuda().to(dtype) for t in (q, k, v, weight)]
    assert _fused_varlen_fits(on_gpu[0], 0.0, core.softmax_scale) == (dtype != torch.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours = with_grads(lambda q, k, v: core(q, k, v, None, packed_seq_params=params), *on_gpu)
    return [t.float().cpu() for t in ours], expected, {event.key for event in prof.key_averages()}


def largest_gap(ours, expected) -> float:
    """The largest difference of the output or a gradient, relative to that tensor's largest value."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, expected))


@pytest.mark.skipif(_varlen_parameters() is None, reason="torch.nn.attention.varlen needs torch >= 2.10")
def test_bf16_pairs_run_in_one_flash_varlen_call_per_layer():
    ours, expected, ops = run_thd(torch.bfloat16)
    assert MATH not in ops and "aten::_flash_attention_forward" in ops, sorted(ops)
    assert "aten::_flash_attention_backward" in ops, sorted(ops)
    assert largest_gap(ours, expected) < 2e-2  # bf16 inputs and outputs against fp32 on CPU


def test_fp32_pairs_take_a_fused_kernel_and_give_the_separate_sequences():
    ours, expected, ops = run_thd(torch.float32)
    assert MATH not in ops, sorted(ops)
    assert largest_gap(ours, expected) < 1e-5
