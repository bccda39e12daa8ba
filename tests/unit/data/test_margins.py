"""--stage rm's per-pair margins: a --map-keys column, written beside the shards, read back with each pair."""

import numpy as np
import pytest

from engine.data.collate import collate_pairs, pack_pairs
from engine.data.dataset import PairwiseDataset
from engine.data.readers import DataError
from engine.formats import MARGIN_KEY, output_path_prefix
from tests.unit.data.test_preprocess import make_records, output_files, run, write_jsonl


def test_margin_column_is_stored_and_read_back_with_each_pair(tmp_path, llama3_dir):
    records = [{**r, "score_gap": 0.25 * i - 1} for i, r in enumerate(make_records(6))]
    _, prefix = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records), map_keys={"margin": "score_gap"})
    assert any(f.endswith(f"_packed_{MARGIN_KEY}_document.bin") for f in output_files(tmp_path))
    dataset = PairwiseDataset(prefix, seq_length=256)
    assert [dataset[i]["margin"] for i in range(6)] == [0.25 * i - 1 for i in range(6)]
    samples = [dataset[i] for i in (4, 1)]
    for batch in (collate_pairs(samples), pack_pairs(samples)):
        assert batch.margins.tolist() == [0.0, -0.75]
    # replaced by a set without margins: the old margin file goes with the old set
    run(tmp_path, llama3_dir, write_jsonl(tmp_path / "e.jsonl", make_records(3)), overwrite=True)
    assert not any(MARGIN_KEY in f for f in output_files(tmp_path))
    assert "margin" not in PairwiseDataset(prefix, seq_length=256)[0]
    assert collate_pairs([PairwiseDataset(prefix, seq_length=256)[0]]).margins is None


@pytest.mark.parametrize("value", ["high", None, float("nan"), True])
def test_a_bad_margin_names_its_column_and_line(tmp_path, llama3_dir, value):
    records = make_records(3)
    records[1]["gap"] = value
    records[0]["gap"] = records[2]["gap"] = 1.0
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'gap'"):
        run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records), map_keys={"margin": "gap"})


def test_margins_of_another_run_are_refused(tmp_path, llama3_dir):
    records = [{**r, "gap": 1.0} for r in make_records(4)]
    _, prefix = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records), map_keys={"margin": "gap"})
    _, other = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "e.jsonl", records[:3]), name="other",
                   map_keys={"margin": "gap"})
    for ext in (".bin", ".idx"):
        src = output_path_prefix(other, MARGIN_KEY) + ext
        dst = output_path_prefix(prefix, MARGIN_KEY) + ext
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    with pytest.raises(DataError, match="3 margins for 4 pairs"):
        PairwiseDataset(prefix, seq_length=256)
    assert np.isfinite(PairwiseDataset(other, seq_length=256)[2]["margin"])


def test_margins_are_refused_for_unpaired_data(tmp_path, llama3_dir):
    records = [{**r, "gap": 1.0} for r in make_records(2)]
    with pytest.raises(ValueError, match="--map-keys margin: a per-pair reward margin .* needs pairwise data"):
        run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records), handler_name="AlpacaStylePairwiseHandler",
            unpair=True, map_keys={"margin": "gap"})
