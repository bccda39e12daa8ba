"""Pairs -> one padded micro-batch ``[chosen x n ; rejected x n]`` for the DPO forward step."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    sequence_ids: torch.Tensor | None = None
    """int64 [rows, L] under packing: which sequence each position belongs to (chosen of pair i is
    i, its rejected n + i, padding -1). None when row r simply holds sequence r."""
    attention_mask: torch.Tensor | None = None
    """bool [rows, 1, L, L] under packing, True where attention is NOT allowed (megatron's
    convention): causal within each sequence, nothing across sequences."""

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device) -> "PairBatch":
        """The same batch with its tensors on `device`."""
        moved = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("tokens", "labels", "position_ids", "sequence_ids", "attention_mask")
                 if getattr(self, name) is not None}
        return replace(self, **moved)


def _sequences(samples: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 2n (input ids, labels) of a micro-batch, chosen of pair i at i and its rejected at n + i,
    each checked to have matching lengths and at least one answer token left after the shift."""
    n = len(samples)
    sequences = [(s[f"{side}_input_ids"], s[f"{side}_labels"]) for side in ("chosen", "rejected") for s in samples]
    for k, (ids, lab) in enumerate(sequences):
        if ids.size != lab.size:
            raise DataError(f"micro-batch sample {k % n}: {ids.size} input ids but {lab.size} labels")
        if (lab[1:] == IGNORE_INDEX).all():
            side = "chosen" if k < n else "rejected"
            raise DataError(f"micro-batch sample {k % n}: the {side} sequence has no response token to "
                            f"train on (all labels are prompt or the response is empty)")
    return sequences


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
    rows = _sequences(samples)
    longest = max(ids.size for ids, _ in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, lab) in enumerate(rows):
        tokens[r, :ids.size] = ids
        labels[r, :lab.size - 1] = lab[1:]
    return PairBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                     position_ids=torch.arange(length, dtype=torch.int64).expand(len(rows), length).contiguous(),
                     num_pairs=len(samples))


def pack_pairs(samples: list[dict], row_capacity: int, pad_to_multiple_of: int = 8, pad_id: int = 0) -> PairBatch:
    """Pack the 2n sequences of a micro-batch into as few rows of `row_capacity` tokens as fit.

    First-fit decreasing (ties by sequence order, so the layout is deterministic). Each
    sequence keeps its own positions (0, 1, ...), its labels are shifted within itself, and
    the block-diagonal causal mask keeps sequences from seeing each other, so every
    sequence's log-probs equal those of the unpacked batch. Chosen and rejected of a pair
    stay in the same micro-batch by construction.
    """
    if not samples:
        raise ValueError("pack_pairs needs at least one pair")
    n = len(samples)
    sequences = _sequences(samples)
    capacity = max(row_capacity, max(ids.size for ids, _ in sequences))
    rows: list[list[int]] = []
    fill: list[int] = []
    for k in sorted(range(2 * n), key=lambda k: (-sequences[k][0].size, k)):
        size = sequences[k][0].size
        row = next((r for r, used in enumerate(fill) if used + size <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(k)
        fill[row] += size
    length = -(-max(fill) // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), length), dtype=np.int64)
    sequence_ids = np.full((len(rows), length), -1, dtype=np.int64)
    for r, members in enumerate(rows):
        start = 0
        for k in sorted(members):
            ids, lab = sequences[k]
            end = start + ids.size
            tokens[r, start:end] = ids
            labels[r, start:end - 1] = lab[1:]
            positions[r, start:end] = np.arange(ids.size)
            sequence_ids[r, start:end] = k
            start = end
        positions[r, start:] = np.arange(length - start)
    ids = torch.from_numpy(sequence_ids)
    # Padding forms one more segment per row, so its (ignored) queries still see a key.
    segment = torch.where(ids >= 0, ids, -1 - torch.arange(len(rows)).unsqueeze(1))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segment.unsqueeze(2) == segment.unsqueeze(1)) & causal
    return PairBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                     position_ids=torch.from_numpy(positions), num_pairs=n, sequence_ids=ids,
                     attention_mask=(~allowed).unsqueeze(1))
