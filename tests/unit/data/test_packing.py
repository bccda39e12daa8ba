"""Sequence packing: the THD layout, positions, boundaries, and per-sequence log-probs equal to the padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.arguments import PreferenceConfig
from engine.data.collate import collate_pairs, pack_pairs
from engine.dpo import objective as objective_module
from engine.dpo.objective import PairwiseObjective
from engine.dpo.stages import build_objective
from tests.output_rows import at_outputs


def pair(prompt: int, chosen: int, rejected: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    head = rng.integers(1, 50, prompt)
    out = {}
    for side, length in (("chosen", chosen), ("rejected", rejected)):
        ids = np.concatenate([head, rng.integers(1, 50, length)])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_labels"] = np.concatenate([np.full(prompt, -100), ids[prompt:]])
    return out


SAMPLES = [pair(3, 5, 2, 0), pair(6, 1, 9, 1), pair(2, 12, 4, 2)]


def test_one_thd_row_holds_every_sequence_in_batch_order_with_its_own_positions_and_boundaries():
    batch = pack_pairs(SAMPLES, pad_to_multiple_of=8)
    sequences = [p["chosen_input_ids"] for p in SAMPLES] + [p["rejected_input_ids"] for p in SAMPLES]
    used = sum(len(s) for s in sequences)  # 8 + 7 + 14 + 5 + 15 + 6 = 55
    assert batch.tokens.shape == (1, 56) and used == 55
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, 8, 15, 29, 34, 49, 55, 56]  # the padding tail is a segment
    assert batch.max_seqlen == 15
    assert batch.seq_lengths == batch.cu_seqlens.diff().tolist()  # on the host, for the attention
    for k, s in enumerate(sequences):
        start, end = batch.cu_seqlens[k].item(), batch.cu_seqlens[k + 1].item()
        assert torch.equal(batch.tokens[0, start:end], torch.from_numpy(s))
        assert torch.equal(batch.position_ids[0, start:end], torch.arange(len(s)))
        assert (batch.sequence_ids[0, start:end] == k).all()
        prompt = (3, 6, 2)[k % 3]
        label = [-100] * prompt + s[prompt:].tolist()
        assert batch.labels[0, start:end - 1].tolist() == label[1:]  # shifted within the sequence
        assert batch.labels[0, end - 1] == -100  # never a target from the next sequence
    assert batch.sequence_ids[0, 55] == -1 and batch.labels[0, 55] == -100


def test_a_row_that_is_already_aligned_gets_no_padding_segment():
    batch = pack_pairs(SAMPLES, pad_to_multiple_of=5)
    assert batch.tokens.shape == (1, 55) and batch.cu_seqlens.tolist()[-1] == 55 and len(batch.cu_seqlens) == 7


@pytest.fixture
def token_value_logprobs(monkeypatch):
    """A fake model whose log-prob of a target depends only on (input token, target): layout-free."""
    def logprobs(logits, labels, vocab):
        return logits[..., 0] * (labels != -100)
    monkeypatch.setattr(objective_module, "vocab_parallel_logprobs", logprobs)
    monkeypatch.setattr(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])


def fake_logits(batch) -> torch.Tensor:
    value = -(batch.tokens.double() * 0.01 + batch.labels.clamp(min=0).double() * 0.001)
    return at_outputs(value.unsqueeze(-1), batch)


@pytest.mark.parametrize("flags", [{}, {"ld_alpha": 0.5}, {"stage": "orpo"}])
def test_packed_and_padded_batches_give_the_same_sequence_logps_loss_and_metrics(token_value_logprobs, flags):
    objective = build_objective(PreferenceConfig(**flags), vocab_size=64)
    prompt = objective.nll_over_prompt
    padded, packed = collate_pairs(SAMPLES, prompt_targets=prompt), pack_pairs(SAMPLES, prompt_targets=prompt)
    a, b = objective.sequence_logps(fake_logits(padded), padded), objective.sequence_logps(fake_logits(packed), packed)
    assert torch.allclose(a.total, b.total) and torch.equal(a.count, b.count)
    if "ld_alpha" in flags:
        assert torch.allclose(a.shared, b.shared)
    if "stage" in flags:  # ORPO's NLL over the prompt too
        assert torch.allclose(a.prompt_total, b.prompt_total) and torch.equal(a.prompt_count, b.prompt_count)
    objective.share_global_counts([padded])
    objective.share_global_counts([packed])
    reference = a.pack() * 1.1 if objective.preference.uses_reference else None
    loss_a, n_a, metrics_a = objective.loss_func(padded, reference, fake_logits(padded))
    loss_b, n_b, metrics_b = objective.loss_func(packed, reference, fake_logits(packed))
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12) and n_a == n_b
    for name in metrics_a:
        assert torch.allclose(metrics_a[name], metrics_b[name]), name
