"""The precomputed reference on one rank: fingerprint, one pass that fills the table, reuse, lookup."""

from __future__ import annotations

import types

import torch

from tests.distributed.harness import run_ranks


class CountingReference:
    """A live reference whose log-probs name their pair: sum 10 i (+1 for the rejected answer), count i."""

    forward_passes = 1

    def logps(self, micro_batches, split=None):
        out = []
        for batch in micro_batches:
            ids = torch.tensor(batch.pair_indices, dtype=torch.float64)
            total = torch.cat([10 * ids, 10 * ids + 1])
            out.append(torch.stack([total, torch.cat([ids, ids])]))
        return out


def _cache_round_trip(directory):
    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed
    from engine.training import reference_cache

    initialize_distributed(ParallelConfig())
    splits = {"train": list(range(7)), "valid": list(range(3))}
    stamp = {"data": ["x"], "rows": 2}
    path = reference_cache.cache_path(directory, stamp)
    make = lambda split, indices: types.SimpleNamespace(pair_indices=indices)  # noqa: E731
    built = []

    def build():
        built.append(1)
        return CountingReference()

    first = reference_cache.load_or_compute(path, stamp, splits, build, 3, make)
    again = reference_cache.load_or_compute(path, stamp, splits, build, 3, make)
    changed = {**stamp, "rows": 3}
    reference_cache.load_or_compute(reference_cache.cache_path(directory, changed), changed, splits, build, 3, make)
    looked_up = again.logps([types.SimpleNamespace(pair_indices=[5, 2])], "train")[0]
    return len(built), first.forward_passes, first.tables["train"], looked_up, path.is_file()


def test_one_pass_fills_the_table_and_a_matching_fingerprint_reuses_it(tmp_path):
    builds, passes, table, looked_up, written = run_ranks(_cache_round_trip, 1, str(tmp_path))[0]
    assert builds == 2  # the first call and the other fingerprint; the second call reused the file
    assert written and passes == 0
    assert table.shape == (7, 2, 2)  # [pairs, (sum, count), (chosen, rejected)]
    assert table[4].tolist() == [[40.0, 41.0], [4.0, 4.0]]
    # A micro-batch of pairs 5 and 2 gets [rows, 2n]: chosen of each pair first, then their rejected.
    assert looked_up.tolist() == [[50.0, 20.0, 51.0, 21.0], [5.0, 2.0, 5.0, 2.0]]


def test_fingerprint_changes_with_every_input(tmp_path):
    from engine.training.reference_cache import fingerprint

    data = tmp_path / "d_packed_x.bin"
    data.write_bytes(b"1234")
    (tmp_path / "ref" / "iter_0000001").mkdir(parents=True)
    base = dict(data_files=[data], split="98,2,0", seq_length=64, reference_root=str(tmp_path / "ref"),
                reference_iteration=1, rows=2, adapters_off=False)
    stamp = fingerprint(**base)
    assert fingerprint(**base) == stamp
    for change in (dict(split="90,10,0"), dict(seq_length=128), dict(reference_iteration=2), dict(rows=3),
                   dict(adapters_off=True)):
        assert fingerprint(**{**base, **change}) != stamp, change
    data.write_bytes(b"12345")
    assert fingerprint(**base) != stamp
