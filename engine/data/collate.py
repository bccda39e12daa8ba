"""Pairs -> one micro-batch for the DPO forward step: padded rows ``[chosen x n ; rejected x n]``
or, under packing, one THD row of the same sequences."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.formats import IGNORE_INDEX
from engine.data.readers import DataError


@dataclass
class PairBatch:
    """One micro-batch of n pairs. Padded: row i is the chosen half of pair i, row n + i its
    rejected half ([2n, L] tensors). Packed: one row [1, t] holding the same 2n sequences in the
    same order, delimited by ``cu_seqlens``."""

    tokens: torch.Tensor
    """int64 input ids, padded with ``pad_id``."""
    labels: torch.Tensor
    """int64 next-token targets (already shifted); IGNORE_INDEX where no loss is taken."""
    position_ids: torch.Tensor
    """int64 position of each token within its own sequence."""
    num_pairs: int
    pair_indices: list[int] | None = None
    """Dataset indices of the n pairs (set by the trainer), for per-pair lookups such as cached
    reference log-probs."""
    sequence_ids: torch.Tensor | None = None
    """int64 [1, t] under packing: which sequence each position belongs to (chosen of pair i is
    i, its rejected n + i, padding -1). None when row r simply holds sequence r."""
    cu_seqlens: torch.Tensor | None = None
    """int32 [segments + 1] under packing: offsets of the sequences in the row (the padding tail,
    if any, is the last segment), for THD attention."""
    max_seqlen: int | None = None
    """Longest segment under packing."""
    seq_lengths: list[int] | None = None
    """The segments' lengths under packing (``cu_seqlens``' differences), kept on the host, where the
    attention splits the row without reading ``cu_seqlens`` back from the device."""
    margins: torch.Tensor | None = None
    """float32 [n]: each pair's reward margin (--stage rm), when the data set has a margin file."""
    global_pairs: torch.Tensor | None = None
    """Pairs in the whole global batch (every micro-batch, every DP rank), a 0-dim tensor on the
    device; set with `global_nll_tokens` when the objective averages a term over the batch's tokens."""
    global_nll_tokens: torch.Tensor | None = None
    """Tokens that term averages over in the whole global batch."""

    def to(self, device: torch.device) -> "PairBatch":
        """The same batch with its tensors on `device`."""
        moved = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("tokens", "labels", "position_ids", "sequence_ids", "cu_seqlens", "margins")
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


def _margins(samples: list[dict]) -> torch.Tensor | None:
    """The pairs' margins when the data carries them (`margin` of each sample), else None."""
    if not any("margin" in s for s in samples):
        return None
    # blended data sets: pairs of a set without margins have margin 0
    return torch.tensor([float(s.get("margin", 0.0)) for s in samples], dtype=torch.float32)


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
                     num_pairs=len(samples), margins=_margins(samples))


def pack_pairs(samples: list[dict], pad_to_multiple_of: int = 8, pad_id: int = 0) -> PairBatch:
    """Concatenate the 2n sequences of a micro-batch into one row: megatron's THD layout.

    Sequences follow each other in batch order (chosen of pairs 0..n-1, then their
    rejected), each with its own positions and its labels shifted within itself;
    ``cu_seqlens`` marks their boundaries for the attention, which stays inside each
    sequence, so every sequence's log-probs equal those of the padded batch. The only
    padding is the tail that rounds the row up to ``pad_to_multiple_of`` (lcm(8, TP)
    under sequence parallel); it forms one more sequence of its own, with no labels.
    """
    if not samples:
        raise ValueError("pack_pairs needs at least one pair")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    sequences = _sequences(samples)
    lengths = [ids.size for ids, _ in sequences]
    used = sum(lengths)
    length = -(-used // pad_to_multiple_of) * pad_to_multiple_of
    if length > used:
        lengths.append(length - used)
    tokens = np.full(length, pad_id, dtype=np.int64)
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(length, dtype=np.int64)
    sequence_ids = np.full(length, -1, dtype=np.int64)
    start = 0
    for k, (ids, lab) in enumerate(sequences):
        end = start + ids.size
        tokens[start:end] = ids
        labels[start:end - 1] = lab[1:]
        positions[start:end] = np.arange(ids.size)
        sequence_ids[start:end] = k
        start = end
    positions[start:] = np.arange(length - start)
    cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return PairBatch(tokens=torch.from_numpy(tokens)[None], labels=torch.from_numpy(labels)[None],
                     position_ids=torch.from_numpy(positions)[None], num_pairs=len(samples),
                     sequence_ids=torch.from_numpy(sequence_ids)[None], cu_seqlens=cu_seqlens,
                     max_seqlen=max(lengths), seq_lengths=lengths, margins=_margins(samples))
