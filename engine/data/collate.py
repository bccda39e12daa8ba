"""Pairs -> one micro-batch for the DPO forward step: padded rows ``[chosen x n ; rejected x n]``
or, under packing, one THD row of the same sequences, with the positions the output layer runs on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.formats import IGNORE_INDEX
from engine.data.readers import DataError


@dataclass
class OutputRows:
    """The positions whose logits the loss reads (those with a target), and what each one scores.

    The output layer and the log-prob kernel run on these positions only: on DPO data the prompt
    positions carry no target, and computing [tokens, vocab] logits there is most of the output
    layer's work. The model selects rows of its last hidden states, megatron's [s, b, h] layout
    flattened to [s * b, h] (position t of row r is row t * b + r). Under sequence parallelism each
    of the `shards` TP ranks holds s / shards consecutive positions and selects its own rows; the
    output layer then all-gathers them, so every shard selects the same count M (padded with positions
    that carry no target). Entries are in that gathered order: shard by shard.
    """

    index: torch.Tensor
    """int64 [shards, M]: each shard's rows of its own flattened [s / shards * b, h] hidden states."""
    targets: torch.Tensor
    """int64 [1, shards * M]: the token each selected position predicts; IGNORE_INDEX on padding."""
    sequence_ids: torch.Tensor
    """int64 [1, shards * M]: which of the 2n sequences each position belongs to (chosen of pair i is i,
    its rejected n + i); -1 on padding."""
    answer_ordinal: torch.Tensor
    """int64 [1, shards * M]: 1-based index of an answer token within its sequence's answer; 0 on the
    prompt targets (--orpo-prompt-loss) and padding."""
    prompt_targets: bool = False
    """The prompt positions are selected too, predicting the next input token (ORPO's NLL over the prompt)."""

    def to(self, device: torch.device, non_blocking: bool = False) -> "OutputRows":
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in ("index", "targets", "sequence_ids", "answer_ordinal")})


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
    outputs: OutputRows | None = None
    """The positions the output layer runs on (see `OutputRows`)."""
    pair_layouts: list[tuple[int, int, int]] | None = None
    """Under --shared-prompt, each pair's (shared prefix P, chosen's own C, rejected's own R) tokens: pair i is one
    sequence [prefix | chosen | rejected] (row i when padded, segment i when packed). None otherwise."""
    padding: torch.Tensor | None = None
    """bool, the shape of ``tokens``: True at the positions that hold no sequence (a padded row's tail, a packed
    row's tail segment), which an MoE model's routers leave out of their losses (megatron's padding_mask)."""

    def to(self, device: torch.device) -> "PairBatch":
        """The same batch with its tensors on `device`."""
        moved = {name: getattr(self, name).to(device, non_blocking=True)
                 for name in ("tokens", "labels", "position_ids", "sequence_ids", "cu_seqlens", "outputs",
                              "margins", "padding")
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


def _output_rows(sequences: list[tuple[np.ndarray, np.ndarray]], placements: list[tuple[int, np.ndarray]],
                 rows: int, length: int, shards: int, prompt_targets: bool) -> OutputRows:
    """`OutputRows` of a micro-batch collated into [rows, length]: sequence k (its own input ids and unshifted
    labels) sits in row `placements[k][0]`, its t-th token at position `placements[k][1][t]`. Position t of a
    sequence predicts its token t + 1: the answer tokens, and with `prompt_targets` every token up to the
    last answer one (ORPO's NLL over the prompt). Under --shared-prompt a position predicts for two sequences
    (the prompt's last, for both answers' first token): it is selected twice."""
    if length % shards:
        raise ValueError(f"a micro-batch of {length} positions does not split into {shards} sequence-parallel "
                         f"shards: pad it to a multiple of the tensor-parallel size")
    entries = []  # columns: row, position, target, sequence, answer ordinal
    for k, ((ids, lab), (row, where)) in enumerate(zip(sequences, placements)):
        answer = lab[1:] != IGNORE_INDEX
        ordinal = np.cumsum(answer) * answer
        keep = np.arange(int(np.flatnonzero(answer)[-1]) + 1) if prompt_targets else np.flatnonzero(answer)
        t = where[keep]
        entries.append(np.stack([np.full_like(t, row), t, ids[keep + 1], np.full_like(t, k), ordinal[keep]], axis=1))
    entries = np.concatenate(entries).astype(np.int64)
    span = length // shards
    shard = entries[:, 1] // span
    local = (entries[:, 1] % span) * rows + entries[:, 0]
    width = max(1, int(np.bincount(shard, minlength=shards).max()))
    index = np.zeros((shards, width), dtype=np.int64)
    fields = np.zeros((3, shards, width), dtype=np.int64)
    fields[0], fields[1] = IGNORE_INDEX, -1
    for s in range(shards):
        mine = shard == s
        count = int(mine.sum())
        index[s, :count] = local[mine]
        fields[:, s, :count] = entries[mine][:, 2:].T
        # padding: unselected positions while there are (their zero gradients leave every sum's bits alone)
        spare = np.setdiff1d(np.arange(span * rows), local[mine])
        index[s, count:] = np.resize(spare if spare.size else local[mine][:1], width - count)
    flat = [torch.from_numpy(f.reshape(1, -1)) for f in fields]
    return OutputRows(torch.from_numpy(index), *flat, prompt_targets=prompt_targets)


def collate_pairs(samples: list[dict], pad_to_multiple_of: int = 8, pad_id: int = 0, shards: int = 1,
                  prompt_targets: bool = False, shared_prompt: bool = False) -> PairBatch:
    """Stack pairs into ``[chosen x n ; rejected x n]`` rows, padded to the micro-batch's own length.

    L is the longest sequence of the micro-batch rounded up to
    ``pad_to_multiple_of`` (the trainer passes lcm(8, TP) under sequence
    parallel), not --seq-length, so short batches cost less. Labels are
    shifted here so that position t is scored on predicting token t + 1:
    ``labels[:, t] = label[t + 1]``; the last real position and all padding get
    IGNORE_INDEX, so the loss mask is simply ``labels != IGNORE_INDEX``.
    `shards` (the TP size under sequence parallelism) and `prompt_targets` shape the `OutputRows`;
    `shared_prompt` makes each pair one row (`shared_pairs`).
    """
    if not samples:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if shared_prompt:
        return shared_pairs(samples, pad_to_multiple_of, pad_id, shards, prompt_targets, packed=False)
    rows = _sequences(samples)
    longest = max(ids.size for ids, _ in rows)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, lab) in enumerate(rows):
        tokens[r, :ids.size] = ids
        labels[r, :lab.size - 1] = lab[1:]
    outputs = _output_rows(rows, [(r, np.arange(ids.size)) for r, (ids, _) in enumerate(rows)], len(rows), length,
                           shards, prompt_targets)
    padding = np.arange(length)[None, :] >= np.array([ids.size for ids, _ in rows])[:, None]
    return PairBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                     position_ids=torch.arange(length, dtype=torch.int64).expand(len(rows), length).contiguous(),
                     num_pairs=len(samples), outputs=outputs, margins=_margins(samples),
                     padding=torch.from_numpy(padding))


def pack_pairs(samples: list[dict], pad_to_multiple_of: int = 8, pad_id: int = 0, shards: int = 1,
               prompt_targets: bool = False, shared_prompt: bool = False) -> PairBatch:
    """Concatenate the 2n sequences of a micro-batch into one row: megatron's THD layout.

    Sequences follow each other in batch order (chosen of pairs 0..n-1, then their
    rejected), each with its own positions and its labels shifted within itself;
    ``cu_seqlens`` marks their boundaries for the attention, which stays inside each
    sequence, so every sequence's log-probs equal those of the padded batch. The only
    padding is the tail that rounds the row up to ``pad_to_multiple_of`` (lcm(8, TP)
    under sequence parallel); it forms one more sequence of its own, with no labels.
    `shared_prompt` makes each pair one segment (`shared_pairs`).
    """
    if not samples:
        raise ValueError("pack_pairs needs at least one pair")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if shared_prompt:
        return shared_pairs(samples, pad_to_multiple_of, pad_id, shards, prompt_targets, packed=True)
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
    start, placements = 0, []
    for k, (ids, lab) in enumerate(sequences):
        placements.append((0, np.arange(start, start + ids.size)))
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
                     max_seqlen=max(lengths), seq_lengths=lengths,
                     outputs=_output_rows(sequences, placements, 1, length, shards, prompt_targets),
                     margins=_margins(samples), padding=torch.from_numpy(sequence_ids < 0)[None])


def shared_prefix_length(chosen: np.ndarray, rejected: np.ndarray) -> int:
    """How many input ids the two sequences of a pair share from the start (--shared-prompt computes them once)."""
    limit = min(chosen.size, rejected.size)
    differs = np.flatnonzero(chosen[:limit] != rejected[:limit])
    return int(differs[0]) if differs.size else limit


def shared_pairs(samples: list[dict], pad_to_multiple_of: int, pad_id: int, shards: int, prompt_targets: bool,
                 packed: bool) -> PairBatch:
    """--shared-prompt: each pair as one sequence [prefix | chosen's rest | rejected's rest], the prefix being
    the longest run of input ids the two share from the start (the prompt, and more if the answers begin alike).

    Positions (RoPE) run 0..P-1 over the prefix, P..P+C-1 over the chosen part and again P..P+R-1 over the
    rejected part, and the attention lets the rejected part see the prefix and itself, never the chosen part
    (engine/model/attention.py), so every token has exactly the context and position it has in its own sequence
    and the prefix is computed once. Padded: row i is pair i; packed: one THD row, segment i pair i, then the
    padding tail. `OutputRows` still name the 2n sequences (chosen of pair i is i, its rejected n + i); the
    prefix's last position predicts both answers' first token and is selected twice. `labels` hold each
    position's own target (the chosen's where the two share one)."""
    n = len(samples)
    sequences = _sequences(samples)
    segments, placements, layouts = [], [None] * (2 * n), []
    for i in range(n):
        (chosen, chosen_labels), (rejected, rejected_labels) = sequences[i], sequences[n + i]
        prefix = shared_prefix_length(chosen, rejected)
        rest = rejected.size - prefix
        ids = np.concatenate([chosen, rejected[prefix:]])
        own = np.full(ids.size, IGNORE_INDEX, dtype=np.int64)
        own[:chosen.size - 1] = chosen_labels[1:]
        own[chosen.size:ids.size - 1] = rejected_labels[prefix + 1:]
        positions = np.concatenate([np.arange(chosen.size), np.arange(prefix, rejected.size)])
        segments.append((ids, own, positions))
        layouts.append((prefix, chosen.size - prefix, rest))
    if packed:
        used = sum(ids.size for ids, _, _ in segments)
        length = -(-used // pad_to_multiple_of) * pad_to_multiple_of
        tokens = np.full((1, length), pad_id, dtype=np.int64)
        labels = np.full((1, length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((1, length), dtype=np.int64)
        sequence_ids = np.full((1, length), -1, dtype=np.int64)
        starts = np.cumsum([0] + [ids.size for ids, _, _ in segments])
        rows_of = [(0, int(start)) for start in starts[:-1]]
        lengths = [ids.size for ids, _, _ in segments] + ([length - used] if length > used else [])
        position_ids[0, used:] = np.arange(length - used)
    else:
        length = -(-max(ids.size for ids, _, _ in segments) // pad_to_multiple_of) * pad_to_multiple_of
        tokens = np.full((n, length), pad_id, dtype=np.int64)
        labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.tile(np.arange(length), (n, 1))
        rows_of = [(i, 0) for i in range(n)]
    for i, ((ids, own, positions), (row, start), (prefix, chosen, rest)) in enumerate(zip(segments, rows_of, layouts)):
        end = start + ids.size
        tokens[row, start:end], labels[row, start:end], position_ids[row, start:end] = ids, own, positions
        if packed:
            sequence_ids[row, start:start + prefix + chosen], sequence_ids[row, start + prefix + chosen:end] = i, n + i
        placements[i] = (row, start + np.arange(prefix + chosen))
        placements[n + i] = (row, start + np.concatenate([np.arange(prefix), prefix + chosen + np.arange(rest)]))
    outputs = _output_rows(sequences, placements, tokens.shape[0], length, shards, prompt_targets)
    ends = np.array([start + ids.size for (ids, _, _), (_, start) in zip(segments, rows_of)])
    padding = np.arange(length)[None, :] >= (ends[-1:] if packed else ends)[:, None]
    batch = PairBatch(tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels),
                      position_ids=torch.from_numpy(position_ids), num_pairs=n, outputs=outputs, pair_layouts=layouts,
                      margins=_margins(samples), padding=torch.from_numpy(padding))
    if packed:
        batch.sequence_ids = torch.from_numpy(sequence_ids)
        batch.cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        batch.max_seqlen, batch.seq_lengths = max(lengths), lengths
    return batch
