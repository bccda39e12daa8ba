"""`OutputRows`: every labelled position selected exactly once, by the shard (sequence-parallel rank) that holds
it, each shard selecting equally many rows; the FLOP count charges the output layer for those only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.arguments import ModelConfig
from engine.data.collate import collate_pairs, pack_pairs
from engine.training.metrics import forward_flops
from tests.unit.data.test_packing import SAMPLES


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("collate", [collate_pairs, pack_pairs])
def test_each_labelled_position_is_selected_once_by_the_shard_that_holds_it(collate, shards):
    batch = collate(SAMPLES, pad_to_multiple_of=8, shards=shards)
    rows, length = batch.labels.shape
    span = length // shards
    index, outputs = batch.outputs.index, batch.outputs
    assert index.shape[0] == shards
    selected = []
    for k in range(shards):
        assert len(set(index[k].tolist())) == index.shape[1]  # distinct: no shared prefix selects a row twice
        assert ((index[k] >= 0) & (index[k] < span * rows)).all()
        positions, row = k * span + index[k] // rows, index[k] % rows  # megatron's [s, b] flattening
        targets = outputs.targets[0, k * index.shape[1]:(k + 1) * index.shape[1]]
        labelled = targets != -100
        assert torch.equal(targets[labelled], batch.labels[row, positions][labelled])
        assert (batch.labels[row, positions][~labelled] == -100).all()  # padding rows carry no target
        selected += [(int(r), int(p)) for r, p in zip(row[labelled], positions[labelled])]
    expected = [(int(r), int(p)) for r, p in zip(*np.nonzero(batch.labels.numpy() != -100))]
    assert sorted(selected) == sorted(expected)
    ids = outputs.sequence_ids[outputs.targets != -100]
    truth = batch.sequence_ids if batch.sequence_ids is not None else torch.arange(rows)[:, None].expand(rows, length)
    assert sorted(ids.tolist()) == sorted(truth[batch.labels != -100].tolist())


def test_a_length_that_does_not_split_into_the_shards_is_refused():
    with pytest.raises(ValueError, match="pad it to a multiple of the tensor-parallel size"):
        collate_pairs(SAMPLES, pad_to_multiple_of=5, shards=2)


def test_the_output_layer_flops_count_the_selected_positions_only():
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=32,
                        vocab_size=1000)
    full = forward_flops(model, 1000, 32)
    assert full == forward_flops(model, 1000, 32, 32)
    assert full - forward_flops(model, 1000, 32, 10) == 2 * 22 * 64 * 1000
