"""Vocab-parallel token log-probs against torch.log_softmax, at TP1, TP2 and TP4, with padded vocab columns."""

from __future__ import annotations

import torch

from tests.distributed.harness import run_ranks

VOCAB, PADDED = 11, 16  # 5 padding columns that must take no probability mass; at TP4 the
# last rank holds padding only


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, PADDED, generator=g, dtype=torch.float64).float()
    logits[..., VOCAB:] = 5.0  # large padding logits: wrong if they leak into the softmax
    labels = torch.tensor([[0, 3, 10, -100, 7], [-100, -100, 0, 1, 10]])
    weights = torch.randn(2, 5, generator=g)
    return logits, labels, weights


def _reference(logits, labels, weights):
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits[..., :VOCAB], dim=-1)
    mask = labels != -100
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    (token * weights).sum().backward()
    return token.detach(), logits.grad


def _vocab_parallel(tp: int):
    from megatron.core import parallel_state

    from engine.arguments import ParallelConfig
    from engine.dpo.logprobs import vocab_parallel_logprobs, vocab_parallel_mean_logits
    from engine.initialize import initialize_distributed

    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    logits, labels, weights = _case()
    rank, width = parallel_state.get_tensor_model_parallel_rank(), PADDED // tp
    local = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    token = vocab_parallel_logprobs(local, labels, VOCAB, chunk_rows=3)  # chunks that split sequences
    (token * weights).sum().backward()
    whole = local.detach().clone().requires_grad_(True)
    (vocab_parallel_logprobs(whole, labels, VOCAB) * weights).sum().backward()
    assert torch.allclose(whole.grad, local.grad, rtol=0, atol=1e-7)  # chunking changes only rounding
    half = local.detach().bfloat16().requires_grad_(True)
    (vocab_parallel_logprobs(half, labels, VOCAB, chunk_rows=4) * weights).sum().backward()
    assert half.grad.dtype == torch.bfloat16
    return token.detach(), local.grad, vocab_parallel_mean_logits(local, VOCAB), half.grad.float()


def test_logprobs_and_grads_match_log_softmax_at_tp1_tp2_tp4():
    logits, labels, weights = _case()
    expected, expected_grad = _reference(logits, labels, weights)
    assert expected[0, 0] != 0  # token id 0 is a real token, not a mask
    for tp in (1, 2, 4):
        results = run_ranks(_vocab_parallel, tp, tp)
        for rank, (token, grad, mean_logits, bf16_grad) in enumerate(results):
            width = PADDED // tp
            assert torch.allclose(token, expected, atol=1e-6), (tp, rank)
            assert torch.allclose(grad, expected_grad[..., rank * width:(rank + 1) * width], atol=1e-6), (tp, rank)
            assert torch.allclose(bf16_grad, grad, atol=2e-2)  # bf16 logits in, bf16 grads out
            assert torch.allclose(mean_logits, logits[..., :VOCAB].mean(-1), atol=1e-6)
