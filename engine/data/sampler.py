"""Which pairs each data-parallel rank trains on, global batch by global batch.

The run reads one endless stream of sample indices: epoch e is a permutation
of ``range(num_samples)`` drawn from ``numpy.random.default_rng((seed, e))``,
and the epochs follow each other. Global batch k is stream positions
``[k * G, (k + 1) * G)``; an epoch's leftover that does not fill a global
batch continues into the next epoch (nothing is dropped, and data sets smaller
than a global batch still work). The stream and the global batches depend only
on (seed, num_samples, global_batch_size), never on the parallel layout, so
TP/PP/DP layouts of one run see the same global batches; DP rank r takes the
r-th contiguous slice of each. A run resumes exactly from ``consumed_samples``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PairwiseBatchSampler:
    """Endless iterator over this rank's micro-batches, one list of them per global batch."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int, seed: int, consumed_samples: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"the training data set has no samples (num_samples={num_samples})")
        if micro_batch_size < 1 or global_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"--micro-batch-size ({micro_batch_size}), --global-batch-size ({global_batch_size}) "
                             f"and the data-parallel size ({data_parallel_size}) must be positive")
        if global_batch_size % (micro_batch_size * data_parallel_size):
            raise ValueError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                             f"{micro_batch_size} x data-parallel size {data_parallel_size} "
                             f"(= {micro_batch_size * data_parallel_size})")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.seed = seed
        self.shuffle = shuffle
        self.consumed_samples = consumed_samples
        """Stream position of the next global batch; advances as batches are yielded (for checkpoints)."""
        self._cached_epoch: int | None = None
        self._cached_order = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)

    def global_batch(self, start: int) -> np.ndarray:
        """Stream positions ``[start, start + global_batch_size)`` as sample indices."""
        out = np.empty(self.global_batch_size, dtype=np.int64)
        filled = 0
        while filled < out.size:
            epoch, offset = divmod(start + filled, self.num_samples)
            take = min(out.size - filled, self.num_samples - offset)
            out[filled:filled + take] = self._order(epoch)[offset:offset + take]
            filled += take
        return out

    def _order(self, epoch: int) -> np.ndarray:
        """``epoch_order`` with the last epoch cached: a global batch rarely spans two."""
        if self._cached_epoch != epoch:
            self._cached_epoch, self._cached_order = epoch, self.epoch_order(epoch)
        return self._cached_order

    def __iter__(self) -> Iterator[list[list[int]]]:
        per_rank = self.global_batch_size // self.data_parallel_size
        while True:
            batch = self.global_batch(self.consumed_samples)
            mine = batch[self.data_parallel_rank * per_rank:(self.data_parallel_rank + 1) * per_rank]
            self.consumed_samples += self.global_batch_size
            yield [mine[i:i + self.micro_batch_size].tolist() for i in range(0, per_rank, self.micro_batch_size)]


def token_budget_micro_batches(rows: list[tuple[int, ...]], budget: int, pad_to_multiple_of: int,
                               packed: bool, count_multiple_of: int = 1) -> list[int]:
    """Sizes of consecutive micro-batches over pairs, in order, each pair given as the lengths of the rows it
    collates into ((chosen, rejected), or one [prompt | chosen | rejected] row under --shared-prompt): a
    micro-batch takes pairs while its collated tokens stay within `budget` (padded: its rows times the longest
    rounded up to `pad_to_multiple_of`; packed: the sum of the lengths rounded up), so a long pair is not padded
    with many short ones' rows and many short pairs share one micro-batch. A pair over the budget alone is a
    micro-batch of its own. The split depends on the lengths alone: every rank of a pipeline and every rerun or
    resume forms the same micro-batches.

    `count_multiple_of`: the interleaved pipeline schedule runs a multiple of PP micro-batches, so the largest
    micro-batch (the first of equals) is halved until the count is one; a part of a micro-batch stays within
    the budget. The pairs must be at least that many (the arguments' rule on --micro-batch-size ensures it)."""
    def round_up(n: int) -> int:
        return -(-n // pad_to_multiple_of) * pad_to_multiple_of

    sizes, count, width, longest, total = [], 0, 0, 0, 0
    for pair in rows:
        grown = (width + len(pair), max(longest, *pair), total + sum(pair))
        tokens = round_up(grown[2]) if packed else grown[0] * round_up(grown[1])
        if count and tokens > budget:
            sizes.append(count)
            count, grown = 0, (len(pair), max(pair), sum(pair))
        count, (width, longest, total) = count + 1, grown
    if count:
        sizes.append(count)
    while len(sizes) % count_multiple_of:
        largest = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
        if sizes[largest] < 2:
            raise ValueError(f"{len(rows)} pairs cannot form a multiple of {count_multiple_of} micro-batches")
        sizes[largest:largest + 1] = [sizes[largest] - sizes[largest] // 2, sizes[largest] // 2]
    return sizes
