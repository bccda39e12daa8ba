"""Sequence packing: layout, masks, positions, and per-sequence log-probs equal to the padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.arguments import PreferenceConfig
from engine.data.collate import collate_pairs, pack_pairs
from engine.dpo import objective as objective_module
from engine.dpo.objective import DPOObjective


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


def test_rows_hold_whole_sequences_with_own_positions_and_block_diagonal_causal_mask():
    batch = pack_pairs(SAMPLES, row_capacity=16, pad_to_multiple_of=8)
    ids = batch.sequence_ids
    assert sorted(set(ids[ids >= 0].tolist())) == list(range(6))  # every sequence present once
    assert batch.tokens.shape[1] == 16 and batch.tokens.shape[0] < 6  # fewer rows than padding needs
    for k, s in enumerate([*[(p["chosen_input_ids"]) for p in SAMPLES], *[(p["rejected_input_ids"]) for p in SAMPLES]]):
        where = ids == k
        assert torch.equal(batch.tokens[where], torch.from_numpy(s))
        assert torch.equal(batch.position_ids[where], torch.arange(len(s)))
    row, mask = 0, batch.attention_mask[0, 0]
    for q in range(16):
        for key in range(16):
            same = ids[row, q] == ids[row, key] or (ids[row, q] < 0 and ids[row, key] < 0)
            assert bool(mask[q, key]) == (not (same and key <= q)), (q, key)


@pytest.fixture
def token_value_logprobs(monkeypatch):
    """A fake model whose log-prob of a target depends only on (input token, target): layout-free."""
    def logprobs(logits, labels, vocab):
        return logits[..., 0] * (labels != -100)
    monkeypatch.setattr(objective_module, "vocab_parallel_logprobs", logprobs)
    monkeypatch.setattr(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])


def fake_logits(batch) -> torch.Tensor:
    value = -(batch.tokens.double() * 0.01 + batch.labels.clamp(min=0).double() * 0.001)
    return value.unsqueeze(-1)


@pytest.mark.parametrize("flags", [{}, {"ld_alpha": 0.5}])
def test_packed_and_padded_batches_give_the_same_sequence_logps_loss_and_metrics(token_value_logprobs, flags):
    objective = DPOObjective(PreferenceConfig(**flags), vocab_size=64)
    padded, packed = collate_pairs(SAMPLES), pack_pairs(SAMPLES, row_capacity=16)
    a, b = objective.sequence_logps(fake_logits(padded), padded), objective.sequence_logps(fake_logits(packed), packed)
    assert torch.allclose(a.total, b.total) and torch.equal(a.count, b.count)
    if flags:
        assert torch.allclose(a.shared, b.shared)
    reference = a.pack() * 1.1
    loss_a, n_a, metrics_a = objective.loss_func(padded, reference, fake_logits(padded))
    loss_b, n_b, metrics_b = objective.loss_func(packed, reference, fake_logits(packed))
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12) and n_a == n_b
    for name in metrics_a:
        assert torch.allclose(metrics_a[name], metrics_b[name]), name
