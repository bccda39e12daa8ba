"""Batch sampler: reproducible epochs, exact resume, global batches independent of the DP layout."""

import itertools

import numpy as np
import pytest

from engine.data.sampler import PairwiseBatchSampler, token_budget_micro_batches


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def global_batches(num_samples, gbs, n, seed=3, dp=1, mbs=1, consumed=0, shuffle=True):
    """The first n global batches as the concatenation over DP ranks (rank order) of their micro-batches."""
    per_rank = [take(PairwiseBatchSampler(num_samples, gbs, mbs, r, dp, seed, consumed, shuffle), n)
                for r in range(dp)]
    return [[i for r in range(dp) for micro in per_rank[r][k] for i in micro] for k in range(n)]


def test_micro_batch_shapes():
    sampler = PairwiseBatchSampler(100, 16, 2, 1, 2, seed=0)
    batch = take(sampler, 1)[0]
    assert len(batch) == 4
    assert all(len(micro) == 2 and all(isinstance(i, int) for i in micro) for micro in batch)


def test_deterministic_and_seeded():
    assert global_batches(50, 8, 5) == global_batches(50, 8, 5)
    assert global_batches(50, 8, 5, seed=3) != global_batches(50, 8, 5, seed=4)


def test_epochs_are_seeded_permutations_continuing_across_batches():
    # 10 samples, global batch 4: batch 2 takes the last 2 of epoch 0 and the first 2 of epoch 1
    stream = [i for b in global_batches(10, 4, 5, seed=7) for i in b]
    epoch0 = np.random.default_rng((7, 0)).permutation(10).tolist()
    epoch1 = np.random.default_rng((7, 1)).permutation(10).tolist()
    assert stream == epoch0 + epoch1
    assert sorted(stream[:10]) == list(range(10)) and epoch0 != epoch1


def test_global_batch_larger_than_data_set():
    batch = global_batches(3, 8, 1, seed=0)[0]
    assert len(batch) == 8 and set(batch) == {0, 1, 2}


def test_no_shuffle_is_sequential():
    assert global_batches(5, 4, 3, shuffle=False) == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]]


def test_resume_from_consumed_samples():
    gbs, dp, mbs = 8, 2, 2
    for rank in range(dp):
        run = PairwiseBatchSampler(27, gbs, mbs, rank, dp, seed=11)
        full = take(run, 9)
        assert run.consumed_samples == 9 * gbs
        resumed = PairwiseBatchSampler(27, gbs, mbs, rank, dp, seed=11, consumed_samples=4 * gbs)
        assert take(resumed, 5) == full[4:]


def test_global_batches_independent_of_dp_size_and_micro_batch():
    reference = global_batches(37, 24, 6, dp=1, mbs=24)
    for dp, mbs in ((1, 1), (2, 3), (3, 4), (4, 2), (8, 3), (24, 1)):
        assert global_batches(37, 24, 6, dp=dp, mbs=mbs) == reference, (dp, mbs)


def test_dp_ranks_take_contiguous_disjoint_slices():
    gbs, dp, mbs = 12, 3, 2
    batch = global_batches(100, gbs, 1)[0]
    for rank in range(dp):
        mine = take(PairwiseBatchSampler(100, gbs, mbs, rank, dp, seed=3), 1)[0]
        assert [i for micro in mine for i in micro] == batch[rank * 4:(rank + 1) * 4]


@pytest.mark.parametrize("args, match", [
    ((100, 6, 4, 0, 1), "--global-batch-size 6 must be a multiple"),
    ((100, 8, 2, 0, 3), "data-parallel size 3"),
    ((100, 8, 0, 0, 1), "--micro-batch-size"),
    ((100, 8, 2, 2, 2), "data-parallel rank 2"),
    ((0, 8, 2, 0, 2), "no samples"),
])
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        PairwiseBatchSampler(*args, seed=0)
    with pytest.raises(ValueError, match="consumed_samples"):
        PairwiseBatchSampler(10, 2, 1, 0, 1, seed=0, consumed_samples=-1)


def test_a_token_budget_fills_micro_batches_in_order_as_they_would_be_collated():
    pairs = [(10, 12), (5, 5), (30, 2), (3, 3), (3, 3)]
    # padded: 2n rows of the longest, rounded to 8: 2 x 2 x 16 = 64 fits, adding (30, 2) makes 2 x 3 x 32
    assert token_budget_micro_batches(pairs, 64, 8, packed=False) == [2, 1, 2]
    # packed: the sum of the lengths, rounded to 8: 22 + 10 + 32 = 64 fits, then 12 -> 16
    assert token_budget_micro_batches(pairs, 64, 8, packed=True) == [3, 2]
    # a pair over the budget forms a micro-batch alone; every pair is placed once
    assert token_budget_micro_batches([(3, 3), (100, 90), (3, 3)], 64, 8, packed=True) == [1, 1, 1]
    assert token_budget_micro_batches([(3, 3)] * 7, 10**6, 8, packed=False) == [7]


def test_the_interleaved_schedule_gets_a_multiple_of_pp_micro_batches_within_the_budget():
    pairs = [(10, 12), (5, 5), (30, 2), (3, 3), (3, 3)]
    # [2, 1, 2] -> the first largest halved -> [1, 1, 1, 2]
    assert token_budget_micro_batches(pairs, 64, 8, packed=False, count_multiple_of=2) == [1, 1, 1, 2]
    assert token_budget_micro_batches(pairs, 64, 8, packed=True, count_multiple_of=2) == [3, 2]  # already even
    assert token_budget_micro_batches([(3, 3)] * 8, 10**6, 8, packed=False, count_multiple_of=4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="3 pairs cannot form a multiple of 4 micro-batches"):
        token_budget_micro_batches([(3, 3)] * 3, 10**6, 8, packed=False, count_multiple_of=4)
