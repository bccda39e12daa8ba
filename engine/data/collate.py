"""Pairs -> one padded micro-batch ``[chosen x n ; rejected x n]`` for the DPO forward step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.data.preprocess import IGNORE_INDEX
from engine.data.readers import DataError


@dataclass
class PairBatch:
    """One micro-batch; row i is the chosen half of pair i, row n + i its rejected half."""

    tokens: torch.Tensor
    """int64 [2n, L] input ids, padded with ``pad_id``."""
    labels: torch.Tensor
    """int64 [2n, L] next-token targets (already shifted); IGNORE_INDEX where no loss is taken."""
    position_ids: torch.Tensor
    """int64 [2n, L] ``arange(L)`` per row."""
    num_pairs: int
    pair_indices: list[int] | None = None
    """Dataset indices of the n pairs (set by the trainer), for per-pair lookups such as cached
    reference log-probs."""

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def collate_pairs(samples: list[dict], pad_to_multiple_of: int = 8, pad_id: int = 0) -> PairBatch:
    """Stack pairs into ``[chosen x n ; rejected x n]`` rows, padded to the micro-batch's own length.

    L is the longest sequence of the micro-batch rounded up to
    ``pad_to_multiple_of`` (the trainer passes lcm(8, TP) under sequence
    parallel), not --seq-length, so short batches cost less. Labels are
    shifted here so that position t is scored on predicting token t + 1:
    ``labels[:, t] = label[t + 1]``; the last real position and all padding get
    IGNORE_INDEX, so the loss mask is simply ``labels != IGNORE_INDEX``.
    """
    if not samples:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    rows = [(s[f"{side}_input_ids"], s[f"{side}_labels"]) for side in ("chosen", "rejected") for s in samples]
    longest = max(ids.size for ids, _ in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, lab) in enumerate(rows):
        if ids.size != lab.size:
            raise DataError(f"micro-batch sample {r % len(samples)}: {ids.size} input ids but {lab.size} labels")
        tokens[r, :ids.size] = ids
        labels[r, :lab.size - 1] = lab[1:]
    empty = np.flatnonzero((labels == IGNORE_INDEX).all(axis=1))
    if empty.size:
        r = int(empty[0])
        side = "chosen" if r < len(samples) else "rejected"
        raise DataError(f"micro-batch sample {r % len(samples)}: the {side} sequence has no response token to "
                        f"train on (all labels are prompt or the response is empty)")
    return PairBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                     position_ids=torch.arange(length, dtype=torch.int64).expand(len(rows), length).contiguous(),
                     num_pairs=len(samples))
