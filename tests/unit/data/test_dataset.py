"""Pairwise data sets: shards read back as truncated pairs, bad shards fail early, split and blend."""

import logging
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from engine.arguments import ConfigError, DataConfig
from engine.data.dataset import BlendedPairwiseDataset, PairwiseDataset, build_pairwise_datasets, split_ranges
from engine.data.preprocess import PairShardWriter
from engine.data.readers import DataError
from engine.data.truncation import truncate_lengths
from engine.formats import IGNORE_INDEX, output_path_prefix


def write_pairs(prefix, pairs):
    """pairs: (prompt, chosen response, rejected response) token lists, written as preprocess writes them."""
    writer = PairShardWriter(str(prefix))
    for prompt, chosen, rejected in pairs:
        writer.add(np.asarray(prompt + chosen, dtype=np.int32), np.asarray(prompt + rejected, dtype=np.int32),
                   len(prompt))
    writer.commit()
    return str(prefix)


def overwrite(prefix, key, docs):
    """Replace one of the four datasets with ``docs`` (to build inconsistent file sets)."""
    path = output_path_prefix(prefix, key)
    builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int32), [len(doc)])
    builder.finalize(path + ".idx")


def tagged_pairs(n, tag=0):
    """Pair i of data set ``tag`` carries ids that say which it is: prompt [tag*100 + i, 7, 8]."""
    return [([tag * 100 + i, 7, 8], [10 + i % 5, 11], [20 + i % 3]) for i in range(n)]


def pair_id(sample):
    return int(sample["chosen_input_ids"][0])


def test_reads_back_pairs_with_masked_prompt(tmp_path):
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8, 9, 10], [11, 12])]
    ds = PairwiseDataset(write_pairs(tmp_path / "d", pairs), seq_length=16, vocab_size=13)
    assert len(ds) == 2
    for (prompt, chosen, rejected), item in zip(pairs, (ds[0], ds[1])):
        assert all(v.dtype == np.int64 for v in item.values())
        assert item["chosen_input_ids"].tolist() == prompt + chosen
        assert item["rejected_input_ids"].tolist() == prompt + rejected
        assert item["chosen_labels"].tolist() == [IGNORE_INDEX] * len(prompt) + chosen
        assert item["rejected_labels"].tolist() == [IGNORE_INDEX] * len(prompt) + rejected


def test_truncation_hand_computed(tmp_path):
    # prompt 6, longest response 5, seq 8: both cut in proportion -> response 8*5//11 = 3, prompt 5 (its tail)
    prompt, chosen, rejected = [1, 2, 3, 4, 5, 6], [10, 11, 12], [20, 21, 22, 23, 24]
    ds = PairwiseDataset(write_pairs(tmp_path / "d", [(prompt, chosen, rejected)]), seq_length=8)
    item = ds[0]
    assert item["chosen_input_ids"].tolist() == [2, 3, 4, 5, 6, 10, 11, 12]
    assert item["rejected_input_ids"].tolist() == [2, 3, 4, 5, 6, 20, 21, 22]
    assert item["chosen_labels"].tolist() == [IGNORE_INDEX] * 5 + [10, 11, 12]
    assert item["rejected_labels"].tolist() == [IGNORE_INDEX] * 5 + [20, 21, 22]


def test_pair_whose_prompts_differ_keeps_each_side_own_prompt_end(tmp_path):
    # a straddling token left the rejected side one more prompt token (7); prompts 6 and 7, longest response 5,
    # seq 8: truncate_lengths(7, 5, 8) keeps 5 prompt tokens and 8*5//12 = 3 answer tokens on each side
    writer = PairShardWriter(str(tmp_path / "d"))
    writer.add(np.asarray([1, 2, 3, 4, 5, 6, 10, 11, 12], np.int32),
               np.asarray([1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23, 24], np.int32), 6, 7)
    writer.commit()
    item = PairwiseDataset(str(tmp_path / "d"), seq_length=8)[0]
    assert item["chosen_input_ids"].tolist() == [2, 3, 4, 5, 6, 10, 11, 12]
    assert item["rejected_input_ids"].tolist() == [3, 4, 5, 6, 7, 20, 21, 22]
    assert item["rejected_labels"].tolist() == [IGNORE_INDEX] * 5 + [20, 21, 22]
    whole = PairwiseDataset(str(tmp_path / "d"), seq_length=16)[0]
    assert whole["chosen_labels"].tolist() == [IGNORE_INDEX] * 6 + [10, 11, 12]
    assert whole["rejected_labels"].tolist() == [IGNORE_INDEX] * 7 + [20, 21, 22, 23, 24]


def test_truncation_follows_preprocessing_rule(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(1, 50, rng.integers(0, 30)).tolist(), rng.integers(1, 50, rng.integers(1, 30)).tolist(),
              rng.integers(1, 50, rng.integers(1, 30)).tolist()) for _ in range(200)]
    seq_length = 24
    ds = PairwiseDataset(write_pairs(tmp_path / "d", pairs), seq_length=seq_length)
    for (prompt, chosen, rejected), i in zip(pairs, range(len(ds))):
        keep_prompt, keep_response = truncate_lengths(len(prompt), max(len(chosen), len(rejected)), seq_length)
        kept = prompt[len(prompt) - keep_prompt:]
        item = ds[i]
        assert item["chosen_input_ids"].tolist() == kept + chosen[:keep_response]
        assert item["rejected_input_ids"].tolist() == kept + rejected[:keep_response]
        assert item["chosen_labels"].tolist() == [IGNORE_INDEX] * len(kept) + chosen[:keep_response]
        assert max(item["chosen_input_ids"].size, item["rejected_input_ids"].size) <= seq_length


def test_logs_how_many_pairs_will_be_truncated(tmp_path, caplog):
    pairs = [([1] * 10, [2] * 5, [3]), ([1], [2], [3]), ([1], [2] * 20, [3])]
    with caplog.at_level(logging.INFO, logger="engine.data.dataset"):
        PairwiseDataset(write_pairs(tmp_path / "d", pairs), seq_length=12)
    assert "2 longer than --seq-length 12 will be truncated" in caplog.text


def test_missing_file_lists_missing_and_present(tmp_path):
    prefix = write_pairs(tmp_path / "d", tagged_pairs(3))
    gone = output_path_prefix(prefix, "rejected_labels") + ".idx"
    os.remove(gone)
    with pytest.raises(DataError, match="incomplete") as e:
        PairwiseDataset(prefix, 16)
    assert f"missing ['{gone}']" in str(e.value)
    assert output_path_prefix(prefix, "chosen_input_ids") + ".bin" in str(e.value)


def test_no_packed_files_suggests_output_prefix(tmp_path):
    prefix = write_pairs(tmp_path / "d", tagged_pairs(3))
    with pytest.raises(DataError, match="preprocess_data.py --output-prefix"):
        PairwiseDataset(str(tmp_path / "nothing"), 16)
    with pytest.raises(DataError, match=f"did you mean '{prefix}'"):
        PairwiseDataset(output_path_prefix(prefix, "chosen_input_ids") + ".bin", 16)
    with pytest.raises(DataError, match="the directory holds"):
        PairwiseDataset(str(tmp_path), 16)


def test_count_mismatch(tmp_path):
    prefix = write_pairs(tmp_path / "d", tagged_pairs(3))
    overwrite(prefix, "rejected_labels", [[IGNORE_INDEX, 1]] * 2)
    with pytest.raises(DataError, match="disagree on the number of pairs") as e:
        PairwiseDataset(prefix, 16)
    assert output_path_prefix(prefix, "rejected_labels") + ".idx: 2" in str(e.value)


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_length_mismatch_names_first_bad_pair(tmp_path, side):
    pairs = tagged_pairs(4)
    prefix = write_pairs(tmp_path / "d", pairs)
    docs = [[IGNORE_INDEX] * 3 + (c if side == "chosen" else r) for _, c, r in pairs]
    docs[2] = docs[2][:-1]
    overwrite(prefix, f"{side}_labels", docs)
    with pytest.raises(DataError, match=f"pair 2: {side} input ids have"):
        PairwiseDataset(prefix, 16)


def test_token_outside_vocab(tmp_path):
    prefix = write_pairs(tmp_path / "d", [([1, 2], [3], [4]), ([5, 2], [3, 99], [4])])
    path = output_path_prefix(prefix, "chosen_input_ids") + ".bin"
    with pytest.raises(DataError, match=r"token id 99 is outside the vocabulary \[0, 50\) \(vocab size 50\)") as e:
        PairwiseDataset(prefix, 16, vocab_size=50)
    assert path in str(e.value)
    PairwiseDataset(prefix, 16, vocab_size=100)


def test_negative_token(tmp_path):
    prefix = write_pairs(tmp_path / "d", tagged_pairs(2))
    overwrite(prefix, "rejected_input_ids", [[1, 7, 8, -3], [2, 7, 8, 20]])
    with pytest.raises(DataError, match="rejected_input_ids_document.bin: token id -3"):
        PairwiseDataset(prefix, 16)


def test_labels_from_another_run(tmp_path):
    pairs = tagged_pairs(3)
    prefix = write_pairs(tmp_path / "d", pairs)
    docs = [[IGNORE_INDEX] * 3 + c for _, c, _ in pairs]
    docs[2][-1] = 44
    overwrite(prefix, "chosen_labels", docs)
    with pytest.raises(DataError, match="pair 2: labels differ from the input ids"):
        PairwiseDataset(prefix, 16)


def test_empty_data_set(tmp_path):
    prefix = write_pairs(tmp_path / "d", [])
    with pytest.raises(DataError, match="empty"):
        PairwiseDataset(prefix, 16)


def test_vocab_check_is_fast_on_millions_of_tokens(tmp_path):
    prefix = str(tmp_path / "big")
    n, length = 20_000, 128  # 2.56M tokens per file
    tokens = np.random.default_rng(0).integers(0, 32000, (n, length), dtype=np.int32)
    for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        path = output_path_prefix(prefix, key)
        builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int32)
        data = tokens.copy()
        if key.endswith("labels"):
            data[:, :16] = IGNORE_INDEX
        builder.data_file.write(data.tobytes())
        builder.sequence_lengths.extend([length] * n)
        builder.document_indices.extend(range(1, n + 1))
        builder.finalize(path + ".idx")
    import time
    start = time.perf_counter()
    ds = PairwiseDataset(prefix, 256, vocab_size=32000)
    assert time.perf_counter() - start < 3.0
    assert len(ds) == n and ds[n - 1]["chosen_input_ids"].tolist() == tokens[-1].tolist()


def parse_split(split: str) -> list[float]:
    return DataConfig(split=split).split_fractions


def test_parse_split():
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("3") == [1.0, 0.0, 0.0]
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0,0", ""):
        with pytest.raises(ConfigError, match="--split"):
            parse_split(bad)


def test_split_ranges_are_contiguous_megatron_rounding():
    assert split_ranges(100, parse_split("98,2,0")) == [(0, 98), (98, 100), (100, 100)]
    assert split_ranges(10, parse_split("1,1,1")) == [(0, 3), (3, 7), (7, 10)]
    ranges = split_ranges(7, parse_split("90,5,5"))
    assert ranges[0][0] == 0 and ranges[-1][1] == 7
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_build_splits_single_prefix(tmp_path):
    prefix = write_pairs(tmp_path / "d", tagged_pairs(10))
    out = build_pairwise_datasets(DataConfig([prefix], "8,2,0"), 16, 200, seed=1)
    assert out["test"] is None
    assert [pair_id(out["train"][i]) for i in range(len(out["train"]))] == list(range(8))
    assert [pair_id(out["valid"][i]) for i in range(len(out["valid"]))] == [8, 9]
    with pytest.raises(IndexError):
        out["valid"][2]


def test_parse_data_path():
    assert DataConfig(["A"]).prefixes_and_weights == (["A"], None)
    assert DataConfig(["0.3", "A", "0.7", "B"]).prefixes_and_weights == (["A", "B"], [0.3, 0.7])
    assert DataConfig(["A", "B"]).prefixes_and_weights == (["A", "B"], None)
    for bad in (["0.3", "A", "B"], ["0", "A", "1", "B"], ["1", "A", "2", "3"], []):
        with pytest.raises(ConfigError, match="--data-path"):
            DataConfig(bad)


def blend_sources(tmp_path):
    return write_pairs(tmp_path / "a", tagged_pairs(40, tag=1)), write_pairs(tmp_path / "b", tagged_pairs(10, tag=2))


def test_blend_proportions_and_determinism(tmp_path):
    a, b = blend_sources(tmp_path)
    train = build_pairwise_datasets(DataConfig(["0.3", a, "0.7", b], "100,0,0"), 16, None, seed=5)["train"]
    ids = [pair_id(train[i]) for i in range(len(train))]
    assert len(ids) == 50
    source = np.array([i // 100 for i in ids])
    assert (source == 1).sum() == 15 and (source == 2).sum() == 35
    prefix_counts = np.cumsum(source == 2)
    assert np.abs(prefix_counts - 0.7 * np.arange(1, 51)).max() <= 1.5  # every prefix is in proportion
    b_ids = [i % 100 for i in ids if i // 100 == 2]
    assert sorted(b_ids[:10]) == list(range(10)) and sorted(b_ids[10:20]) == list(range(10))  # whole cycles
    assert len(set(i for i in ids if i // 100 == 1)) == 15  # subsampled without repeats

    again = build_pairwise_datasets(DataConfig(["0.3", a, "0.7", b], "100,0,0"), 16, None, seed=5)["train"]
    assert [pair_id(again[i]) for i in range(len(again))] == ids
    other = build_pairwise_datasets(DataConfig(["0.3", a, "0.7", b], "100,0,0"), 16, None, seed=6)["train"]
    assert [pair_id(other[i]) for i in range(len(other))] != ids


def test_blend_splits_each_prefix_first(tmp_path):
    a, b = blend_sources(tmp_path)
    out = build_pairwise_datasets(DataConfig(["1", a, "1", b], "80,20,0"), 16, None, seed=0)
    valid = {pair_id(out["valid"][i]) for i in range(len(out["valid"]))}
    assert valid <= {100 + i for i in range(32, 40)} | {200 + i for i in range(8, 10)}
    train = {pair_id(out["train"][i]) for i in range(len(out["train"]))}
    assert not train & valid
    assert out["test"] is None


def test_unweighted_prefixes_use_each_pair_once(tmp_path):
    a, b = blend_sources(tmp_path)
    train = build_pairwise_datasets(DataConfig([a, b], "1"), 16, None, seed=0)["train"]
    ids = sorted(pair_id(train[i]) for i in range(len(train)))
    assert ids == sorted([100 + i for i in range(40)] + [200 + i for i in range(10)])


def test_blend_rejects_mismatched_weights():
    with pytest.raises(ValueError):
        BlendedPairwiseDataset([], [], seed=0)
