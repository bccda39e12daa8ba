"""Pairwise training data: the preprocessed shards as pairs, split and blended.

``PairwiseDataset`` reads the four indexed datasets that ``preprocess_data.py``
writes and checks them once, vectorized over the memmapped tokens, so that a
bad or mismatched file set fails before training starts rather than at some
step hours in. ``build_pairwise_datasets`` turns Megatron's ``--data-path`` and
``--split`` into train/valid/test data sets: each prefix is split into
contiguous document ranges, then the prefixes are blended by weight.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import Dataset

from engine.arguments import DataConfig
from engine.data.readers import DataError
from engine.data.truncation import cut_sequence, truncate_lengths
from engine.formats import IGNORE_INDEX, MARGIN_KEY, OUTPUT_KEYS, missing_shards_message, output_path_prefix

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
CHECK_CHUNK = 1 << 24
"""Tokens per vectorized check step: bounds the temporary arrays to a few hundred MB."""


def _check_token_range(path: str, dtype: type, vocab_size: int | None, labels: bool) -> None:
    """Every id in ``path`` lies in [0, vocab_size) (labels may also be IGNORE_INDEX)."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    high = np.iinfo(np.int64).max if vocab_size is None else vocab_size
    for start in range(0, tokens.size, CHECK_CHUNK):
        chunk = tokens[start:start + CHECK_CHUNK]
        if labels:
            chunk = chunk[chunk != IGNORE_INDEX]
        if chunk.size and (chunk.min() < 0 or chunk.max() >= high):
            bad = chunk[(chunk < 0) | (chunk >= high)][0]
            what = "label" if labels else "token"
            allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            extra = f" or {IGNORE_INDEX}" if labels else ""
            raise DataError(f"{path}: {what} id {int(bad)} is outside the vocabulary {allowed}{extra} "
                            f"(vocab size {vocab_size}); was the data preprocessed with another tokenizer?")


def _check_labels_match(ids_path: str, labels_path: str, dtype: type, pointers: np.ndarray) -> None:
    """Labels equal the input ids except where masked: catches files from two different runs."""
    ids = np.memmap(ids_path, dtype=dtype, mode="r")
    labels = np.memmap(labels_path, dtype=dtype, mode="r")
    for start in range(0, ids.size, CHECK_CHUNK):
        a, b = ids[start:start + CHECK_CHUNK], labels[start:start + CHECK_CHUNK]
        bad = np.flatnonzero((a != b) & (b != IGNORE_INDEX))
        if bad.size:
            pair = int(np.searchsorted(pointers, start + bad[0], side="right") - 1)
            raise DataError(f"{labels_path}: pair {pair}: labels differ from the input ids in {ids_path} "
                            f"(labels must be the input ids with prompt positions {IGNORE_INDEX})")


def open_shards(prefix: str, keys: tuple[str, ...], unit: str) -> tuple[dict[str, str], dict[str, IndexedDataset]]:
    """The indexed datasets of one preprocessed prefix (`keys`: pairwise or unpaired), by key, with their paths:
    each must exist and hold tokens, and all must hold the same number of `unit`s (pairs, samples)."""
    paths = {k: output_path_prefix(prefix, k) for k in keys}
    if not all(IndexedDataset.exists(p) for p in paths.values()):
        raise DataError(missing_shards_message(prefix, keys))
    empty = [p + ".bin" for p in paths.values() if not os.path.getsize(p + ".bin")]
    if empty:  # megatron cannot memory-map an empty file
        raise DataError(f"--data-path {prefix!r}: the data set is empty (no tokens in {empty})")
    datasets = {k: IndexedDataset(p) for k, p in paths.items()}
    counts = {k: len(d) for k, d in datasets.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{paths[k]}.idx: {n}" for k, n in counts.items())
        raise DataError(f"--data-path {prefix!r}: the {len(keys)} files disagree on the number of {unit}s ({listed})")
    return paths, datasets


def check_ids_and_labels(prefix: str, paths: dict[str, str], datasets: dict[str, IndexedDataset], side: str,
                         unit: str, vocab_size: int | None) -> None:
    """One side's `{side}_input_ids` and `{side}_labels` files: a label per token, ids in the vocabulary, and
    labels that are the ids with prompt positions masked (files of one preprocessing run)."""
    ids_key, labels_key = f"{side}_input_ids", f"{side}_labels"
    ids, labels = datasets[ids_key], datasets[labels_key]
    bad = np.flatnonzero(ids.sequence_lengths != labels.sequence_lengths)
    if bad.size:
        i = int(bad[0])
        named = "" if side == "completion" else f"{side} "
        raise DataError(f"--data-path {prefix!r}: {unit} {i}: {named}input ids have {ids.sequence_lengths[i]} tokens "
                        f"in {paths[ids_key]}.bin but {labels.sequence_lengths[i]} labels in {paths[labels_key]}.bin "
                        f"({bad.size} such {unit}s)")
    ids_bin, labels_bin = paths[ids_key] + ".bin", paths[labels_key] + ".bin"
    _check_token_range(ids_bin, ids.index.dtype, vocab_size, labels=False)
    _check_token_range(labels_bin, labels.index.dtype, vocab_size, labels=True)
    if ids.index.dtype == labels.index.dtype:
        offsets = ids.index.sequence_pointers // np.dtype(ids.index.dtype).itemsize
        _check_labels_match(ids_bin, labels_bin, ids.index.dtype, offsets)


class PairwiseDataset(Dataset):
    """Preference pairs of one preprocessed data set, each truncated to ``seq_length``.

    Item ``i`` is a dict of int64 arrays ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (labels aligned with the ids,
    prompt positions ``IGNORE_INDEX``; the collate function shifts them), plus ``margin`` (a float) when the
    data set has a margin file (engine/formats.py MARGIN_KEY).
    """

    def __init__(self, prefix: str, seq_length: int, vocab_size: int | None = None) -> None:
        if seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {seq_length}")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab size must be positive, got {vocab_size}")
        self.prefix = prefix
        self.seq_length = seq_length
        paths, self.datasets = open_shards(prefix, OUTPUT_KEYS, "pair")
        for side in ("chosen", "rejected"):
            check_ids_and_labels(prefix, paths, self.datasets, side, "pair", vocab_size)
        self.margins = self._margins(output_path_prefix(prefix, MARGIN_KEY))
        lengths = np.maximum(self.datasets["chosen_input_ids"].sequence_lengths,
                             self.datasets["rejected_input_ids"].sequence_lengths)
        long = int(np.count_nonzero(lengths > seq_length))
        logger.info("%s: %d pairs, %d longer than --seq-length %d will be truncated (longest %d tokens)",
                    prefix, len(self), long, seq_length, int(lengths.max()))

    def _margins(self, path: str) -> np.ndarray | None:
        """The per-pair margins, read whole (4 bytes a pair), or None when the data set has none."""
        if not IndexedDataset.exists(path):
            return None
        margins = IndexedDataset(path)
        if len(margins) != len(self) or not (margins.sequence_lengths == 1).all():
            raise DataError(f"{path}.idx holds {len(margins)} margins for {len(self)} pairs (one per pair expected): "
                            "it belongs to another preprocessing run; preprocess again with --overwrite")
        if margins.index.dtype != np.float32:
            raise DataError(f"{path}.idx: margins must be float32, found {margins.index.dtype.__name__}")
        return np.array(np.memmap(path + ".bin", dtype=np.float32, mode="r")[:len(self)])  # the .bin is the values

    def __len__(self) -> int:
        return len(self.datasets["chosen_input_ids"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        seqs = {k: d.get(int(i)).astype(np.int64) for k, d in self.datasets.items()}
        prompt = {side: prompt_length(seqs[f"{side}_labels"]) for side in ("chosen", "rejected")}
        longest = max(prompt.values())
        response = max(seqs[f"{side}_input_ids"].size - prompt[side] for side in prompt)
        keep_prompt, keep_response = truncate_lengths(longest, response, self.seq_length)
        if keep_prompt != longest or keep_response != response:
            seqs = {k: cut_sequence(s, prompt[k.split("_")[0]], keep_prompt, keep_response)[0]
                    for k, s in seqs.items()}
        if self.margins is not None:
            seqs["margin"] = float(self.margins[i])
        return seqs


def prompt_length(labels: np.ndarray) -> int:
    """The prompt is the leading run of masked labels. The two halves of a pair usually share it; they
    differ where a token straddles the prompt/answer boundary in one of them (see engine/data/preprocess.py),
    and truncation then keeps the end of each side's own prompt, as preprocessing does."""
    unmasked = np.flatnonzero(labels != IGNORE_INDEX)
    return int(unmasked[0]) if unmasked.size else labels.size


class BlendedPairwiseDataset(Dataset):
    """Several data sets interleaved in proportion to their weights, exactly and reproducibly.

    The blend has as many samples as its sources together; source ``j`` gets
    ``weights[j]`` of them (largest remainder rounding), its k-th sample placed
    at fraction ``(k + 1/2) / count_j`` of the blend, so every prefix of the
    blend holds each source in proportion to within about one sample. A source
    drawn more (or less) often than its size repeats (or subsamples) its pairs
    in an order shuffled by ``(seed, source, cycle)``, so no pair is favoured.
    """

    def __init__(self, datasets: list[Dataset], weights: list[float], seed: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per data set")
        self.datasets = datasets
        total = sum(len(d) for d in datasets)
        share = np.asarray(weights, dtype=np.float64) / sum(weights) * total
        counts = np.floor(share).astype(np.int64)
        # largest remainders get the samples left over; ties go to the earlier source
        counts[np.argsort(-(share - counts), kind="stable")[:total - counts.sum()]] += 1
        keys, source, sample = [], [], []
        for j, (dataset, count) in enumerate(zip(datasets, counts)):
            cycles = -(-count // len(dataset))
            order = np.concatenate([np.random.default_rng((seed, j, c)).permutation(len(dataset))
                                    for c in range(cycles)] or [np.empty(0, np.int64)])
            keys.append((np.arange(count) + 0.5) / count)
            source.append(np.full(count, j, dtype=np.int64))
            sample.append(order[:count])
        keys, source, sample = np.concatenate(keys), np.concatenate(source), np.concatenate(sample)
        position = np.lexsort((source, keys))
        self.source, self.sample = source[position], sample[position]
        self.counts = counts

    def __len__(self) -> int:
        return self.source.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.datasets[self.source[i]][int(self.sample[i])]


class _Range(Dataset):
    """Documents ``[start, stop)`` of a data set: one split of it."""

    def __init__(self, dataset: Dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} pairs")
        return self.dataset[self.start + i]


def split_ranges(num_documents: int, split: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, stop) per split, rounded as Megatron does (``round(cumulative * n)``)."""
    bounds = np.rint(np.cumsum([0.0] + split) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def build_pairwise_datasets(data: DataConfig, seq_length: int, vocab_size: int | None,
                            seed: int, reader: type[Dataset] = PairwiseDataset) -> dict[str, Dataset | None]:
    """train/valid/test pair data sets from ``--data-path`` and ``--split``.

    Each prefix is split into contiguous document ranges (train first), then
    the prefixes' ranges of one split are blended by weight (unweighted
    prefixes: by size, i.e. each pair once). A split with no pairs is None.
    `reader(prefix, seq_length, vocab_size)` reads one prefix (unpaired data: engine/data/unpaired.py).
    """
    prefixes, weights = data.prefixes_and_weights
    fractions, split = data.split_fractions, data.split
    datasets = [reader(p, seq_length, vocab_size) for p in prefixes]
    out: dict[str, Dataset | None] = {}
    for s, name in enumerate(SPLIT_NAMES):
        parts = []
        for j, dataset in enumerate(datasets):
            start, stop = split_ranges(len(dataset), fractions)[s]
            if stop > start:
                parts.append((_Range(dataset, start, stop), weights[j] if weights else stop - start))
            elif fractions[s] > 0:
                logger.warning("--split %s leaves no %s pairs of %s (%d pairs)", split, name, prefixes[j], len(dataset))
        if not parts:
            out[name] = None
        elif len(parts) == 1:
            out[name] = parts[0][0]
        else:
            out[name] = BlendedPairwiseDataset([d for d, _ in parts], [w for _, w in parts], seed)
        if out[name] is not None:
            logger.info("%s: %d pairs from %d data set(s)", name, len(out[name]), len(parts))
    return out
