"""Test helper: a fake model's per-position values at a batch's `OutputRows`, in the order the model returns them."""

from __future__ import annotations

import torch


def at_outputs(values: torch.Tensor, batch) -> torch.Tensor:
    """`values` [rows, L, ...] of every position -> [1, K, ...] at `batch.outputs`: shard by shard, each shard's
    rows of its flattened [L / shards * rows] slice (megatron's [s, b] order), as `PreferenceGPTModel` selects."""
    index = batch.outputs.index
    shards, span = index.shape[0], values.shape[1] // index.shape[0]
    by_position = values.transpose(0, 1)  # [L, rows, ...]
    parts = [by_position[k * span:(k + 1) * span].flatten(0, 1)[index[k]] for k in range(shards)]
    return torch.cat(parts).unsqueeze(0)
