"""Unpaired preference data (KTO): one completion per prompt with a thumbs-up / thumbs-down label.

Preprocessing reads ``{prompt or messages, completion, label}`` records (``UnpairedHandler``), or
pairwise records turned into two unpaired samples (``--unpair``: chosen -> desirable, rejected ->
undesirable), through the same templates, truncation and workers as the pairwise path, and writes
``PREFIX_packed_{completion_input_ids,completion_labels,desirable}_document.{bin,idx}``
(engine/formats.py ``UNPAIRED_KEYS``).

Training needs, beside each sample, a mismatched one for KTO's KL reference point: the sample's
prompt with another sample's completion. TRL's KTOTrainer rotates the completions by one within
each batch of its (sequential) data loader: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
``MismatchedPairs`` does the same within fixed blocks of --micro-batch-size samples (drawn once by
a seeded permutation, so prompts and labels of neighbouring file lines are not grouped), and
``BlockBatchSampler`` shuffles whole blocks, so every micro-batch is one block: its KL completions
are exactly its own completions, each with another prompt. The pairing is a function of the sample
index, which is what lets the reference cache hold the KL completions' log-probs too.

A training item is a pair in the pairwise layout (``chosen_*``: prompt + completion; ``rejected_*``:
prompt + the KL completion) plus ``desirable``, so the pairwise collate, packing, reference pass
and reference cache serve it unchanged; ``UnpairedBatch.completions`` is the view the policy's
gradient pass runs on (the completions alone).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.data.collate import PairBatch, collate_pairs, pack_pairs
from engine.data.dataset import check_ids_and_labels, open_shards, prompt_length
from engine.data.handlers import PairwiseHandler, PairwiseSample, RecordError, MessagesMixin
from engine.data.readers import DataError
from engine.data.sampler import PairwiseBatchSampler
from engine.data.records import Conversation
from engine.data.truncation import truncate_lengths
from engine.formats import IGNORE_INDEX, UNPAIRED_KEYS

logger = logging.getLogger(__name__)

KL_PAIRING_STREAM = 4021
"""Second seed component of the permutation that groups samples into KL blocks (apart from the sampler's)."""


# -- preprocessing: records -> unpaired samples ------------------------------------------------------------------
@dataclass(frozen=True)
class UnpairedSample:
    """A prompt, one answer and whether it is desirable."""

    conversation: Conversation
    completion: str
    desirable: bool


def unpair(sample: PairwiseSample) -> list[UnpairedSample]:
    """--unpair: a pair as two unpaired samples, the chosen answer desirable and the rejected one not
    (TRL's unpair_preference_dataset)."""
    return [UnpairedSample(sample.conversation, sample.chosen, True),
            UnpairedSample(sample.conversation, sample.rejected, False)]


class UnpairedHandler(PairwiseHandler, MessagesMixin):
    """TRL's unpaired preference shape: ``{"prompt", "completion", "label"}`` with ``label`` a boolean.

    The prompt is a string (with optional ``system`` and ``history``) or a role/content message list
    ending with a user turn; ``messages`` may replace ``prompt`` (ending with the user turn, with
    ``completion`` beside it, or ending with the assistant's completion, as ms-swift's KTO data).
    The completion is a string or one assistant message.
    """

    name = "UnpairedHandler"
    defaults = {"prompt": "prompt", "messages": "messages", "completion": "completion", "label": "label",
                "system": "system", "history": "history"}

    def _conv(self, messages: Any, logical: str, system: str | None) -> Conversation:
        return self._conversation(messages, self.keys[logical], "role", "content", "user", "assistant", "system",
                                  system)

    def _completion(self, value: Any, logical: str) -> str:
        column = self.keys[logical]
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            if value[0].get("role") != "assistant":
                raise RecordError("must hold one assistant message", column)
            value = value[0].get("content")
        if not isinstance(value, str):
            raise RecordError(f"must be a string or one assistant message, got {type(value).__name__}", column)
        if not value.strip():
            raise RecordError("is empty", column, "empty_field")
        return value

    def __call__(self, record: dict) -> list[UnpairedSample]:
        label = self._get(record, "label", required=True)
        if not isinstance(label, bool):
            raise RecordError(f"must be true (desirable) or false (undesirable), got {label!r}", self.keys["label"])
        system = self._text(record, "system")
        prompt = self._get(record, "prompt")
        completion = self._get(record, "completion")
        if prompt is None:
            messages = self._get(record, "messages")
            if messages is None:
                raise RecordError("missing required key (or give 'messages')", self.keys["prompt"], "missing_field")
            if completion is None:  # the conversation ends with the labelled assistant answer
                if not isinstance(messages, list) or len(messages) < 2:
                    raise RecordError("must end with the labelled assistant message when there is no "
                                      f"{self.keys['completion']!r}", self.keys["messages"])
                messages, completion = messages[:-1], messages[-1:]
                answer = self._completion(completion, "messages")
            else:
                answer = self._completion(completion, "completion")
            return [UnpairedSample(self._conv(messages, "messages", system), answer, label)]
        if completion is None:
            raise RecordError("missing required key", self.keys["completion"], "missing_field")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError("is empty", self.keys["prompt"], "empty_field")
            conv = Conversation(prompt=prompt, system=system, history=self._history(record))
        else:
            conv = self._conv(prompt, "prompt", system)
        return [UnpairedSample(conv, self._completion(completion, "completion"), label)]


UNPAIRED_HANDLERS = {UnpairedHandler.name: UnpairedHandler}


# -- training: shards -> samples -> samples with their KL completion ---------------------------------------------
class UnpairedDataset(Dataset):
    """Unpaired samples of one preprocessed data set, each truncated to ``seq_length``.

    Item ``i``: ``input_ids`` and ``labels`` (int64, labels aligned, prompt positions IGNORE_INDEX),
    ``prompt_length`` and ``desirable``. The files are checked once, vectorized, as the pairwise ones.
    """

    def __init__(self, prefix: str, seq_length: int, vocab_size: int | None = None) -> None:
        if seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {seq_length}")
        self.prefix, self.seq_length = prefix, seq_length
        paths, self.datasets = open_shards(prefix, UNPAIRED_KEYS, "sample")
        check_ids_and_labels(prefix, paths, self.datasets, "completion", "sample", vocab_size)
        flags = self.datasets["desirable"]
        if (flags.sequence_lengths != 1).any():
            i = int(np.flatnonzero(flags.sequence_lengths != 1)[0])
            raise DataError(f"{paths['desirable']}.bin: sample {i}: {flags.sequence_lengths[i]} values, expected one "
                            "(1 desirable, 0 undesirable)")
        self.desirable = np.memmap(paths["desirable"] + ".bin", dtype=flags.index.dtype, mode="r").astype(np.int64)
        if not np.isin(self.desirable, (0, 1)).all():
            i = int(np.flatnonzero(~np.isin(self.desirable, (0, 1)))[0])
            raise DataError(f"{paths['desirable']}.bin: sample {i}: value {self.desirable[i]}, expected 1 (desirable) "
                            "or 0 (undesirable)")
        logger.info("%s: %d unpaired samples (%d desirable), %d longer than --seq-length %d will be truncated",
                    prefix, len(self), int(self.desirable.sum()),
                    int((self.datasets["completion_input_ids"].sequence_lengths > seq_length).sum()), seq_length)

    def __len__(self) -> int:
        return len(self.datasets["desirable"])

    def __getitem__(self, i: int) -> dict:
        ids = self.datasets["completion_input_ids"].get(int(i)).astype(np.int64)
        labels = self.datasets["completion_labels"].get(int(i)).astype(np.int64)
        p = prompt_length(labels)
        keep_prompt, keep_completion = truncate_lengths(p, ids.size - p, self.seq_length)
        keep = slice(p - keep_prompt, p + keep_completion)
        return {"input_ids": ids[keep], "labels": labels[keep], "prompt_length": keep_prompt,
                "desirable": bool(self.desirable[i])}


class MismatchedPairs(Dataset):
    """Samples with their KL completion, grouped into blocks of ``block`` consecutive indices.

    A seeded permutation of the samples (cycled to a whole number of blocks when the count is not
    one) is cut into blocks; within a block, sample k's KL completion is sample k-1's (the first
    takes the last's), TRL's rotation. Item ``j`` is the pairwise layout: ``chosen_*`` the sample
    itself, ``rejected_*`` its prompt followed by the KL completion, cut to ``seq_length`` like a
    pair; plus ``desirable``.
    """

    def __init__(self, dataset: Dataset, block: int, seq_length: int, seed: int) -> None:
        self.dataset, self.block, self.seq_length = dataset, block, seq_length
        blocks = -(-len(dataset) // block)
        order = np.random.default_rng((seed, KL_PAIRING_STREAM)).permutation(len(dataset))
        self.order = np.resize(order, blocks * block)

    def __len__(self) -> int:
        return self.order.size

    def partner(self, j: int) -> int:
        """The index (in this data set) of the item whose completion is item j's KL completion."""
        start = j - j % self.block
        return start + (j - start - 1) % self.block

    def __getitem__(self, j: int) -> dict:
        if not 0 <= j < len(self):
            raise IndexError(f"index {j} out of range for {len(self)} samples")
        sample = self.dataset[int(self.order[j])]
        other = self.dataset[int(self.order[self.partner(j)])]
        p, q = sample["prompt_length"], other["prompt_length"]
        completion = other["input_ids"][q:]
        keep_prompt, keep_completion = truncate_lengths(p, completion.size, self.seq_length)
        prompt = sample["input_ids"][p - keep_prompt:p]
        kl_ids = np.concatenate([prompt, completion[:keep_completion]])
        kl_labels = np.concatenate([np.full(keep_prompt, IGNORE_INDEX, dtype=np.int64), completion[:keep_completion]])
        return {"chosen_input_ids": sample["input_ids"], "chosen_labels": sample["labels"],
                "rejected_input_ids": kl_ids, "rejected_labels": kl_labels, "desirable": sample["desirable"]}


class BlockBatchSampler:
    """`PairwiseBatchSampler` over whole blocks of ``block`` items: each micro-batch is one block of
    `MismatchedPairs`, so its KL completions are its own completions. The stream of blocks depends only
    on (seed, blocks, global batch), as the pairwise sampler's, so every parallel layout sees the same
    micro-batches; ``consumed_samples`` counts items."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, seed: int, consumed_samples: int = 0, shuffle: bool = True) -> None:
        if num_samples % micro_batch_size:
            raise ValueError(f"{num_samples} samples do not form whole blocks of --micro-batch-size {micro_batch_size}")
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise ValueError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                             f"{micro_batch_size} x data-parallel size {data_parallel_size}")
        self.block = micro_batch_size
        self.blocks = PairwiseBatchSampler(num_samples // micro_batch_size, global_batch_size // micro_batch_size, 1,
                                           data_parallel_rank, data_parallel_size, seed,
                                           consumed_samples // micro_batch_size, shuffle)

    def __iter__(self) -> Iterator[list[list[int]]]:
        for micro_batches in self.blocks:
            yield [list(range(b * self.block, (b + 1) * self.block)) for (b,) in micro_batches]


@dataclass
class UnpairedBatch(PairBatch):
    """A KTO micro-batch of n samples: the pairwise layout of (completion, KL completion) pairs, rows
    ``[completions x n ; KL completions x n]`` (or one packed row of them), and each sample's label."""

    desirable: torch.Tensor | None = None
    """bool [n]: sample i's completion is desirable (thumbs-up)."""
    pad_to_multiple_of: int = 1
    """The row-length multiple of the collate (`completions` keeps it)."""

    def to(self, device: torch.device) -> UnpairedBatch:
        moved = super().to(device)
        return replace(moved, desirable=self.desirable.to(device, non_blocking=True))

    def completions(self) -> PairBatch:
        """The n completions alone, the sequences the policy's loss and gradient need (the KL completions only
        enter through the detached KL point): padded, the first n rows; packed, the row up to the first KL
        completion, rounded up to the collate's multiple with a tail segment that has no labels. Sequence k
        of the view is sample k (`sequence_ids`), ``num_pairs`` stays n."""
        n = self.num_pairs
        if self.cu_seqlens is None:
            return PairBatch(tokens=self.tokens[:n], labels=self.labels[:n], position_ids=self.position_ids[:n],
                             num_pairs=n, pair_indices=self.pair_indices, padding=self.padding[:n])
        used = sum(self.seq_lengths[:n])
        length = -(-used // self.pad_to_multiple_of) * self.pad_to_multiple_of
        lengths = self.seq_lengths[:n] + ([length - used] if length > used else [])
        tail = torch.arange(length, device=self.labels.device) >= used
        cu_seqlens = torch.cat([self.cu_seqlens[:n + 1], self.cu_seqlens.new_full((1,), length)]) \
            if length > used else self.cu_seqlens[:n + 1]
        return PairBatch(tokens=self.tokens[:, :length], labels=self.labels[:, :length].masked_fill(tail, IGNORE_INDEX),
                         position_ids=self.position_ids[:, :length], num_pairs=n, pair_indices=self.pair_indices,
                         sequence_ids=self.sequence_ids[:, :length].masked_fill(tail, -1), cu_seqlens=cu_seqlens,
                         max_seqlen=max(lengths), seq_lengths=lengths, padding=tail[None])


def collate_unpaired(samples: list[dict], pad_to_multiple_of: int = 8, packed: bool = False,
                     shards: int = 1) -> UnpairedBatch:
    """`MismatchedPairs` items -> one `UnpairedBatch` (padded rows, or one THD row under packing), with the
    `OutputRows` of its 2n sequences (split into `shards` sequence-parallel shards) that the reference and
    pre-step passes run the output layer on; its `completions()` view has none (the loss reads every position)."""
    batch = (pack_pairs if packed else collate_pairs)(samples, pad_to_multiple_of, shards=shards)
    desirable = torch.tensor([bool(s["desirable"]) for s in samples], dtype=torch.bool)
    return UnpairedBatch(**vars(batch), desirable=desirable, pad_to_multiple_of=pad_to_multiple_of)
