"""Readers: every input kind yields records in a fixed order with positions errors can name."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.readers import DataError, find_sources, first_record_columns, read_records

RECORDS = [{"a": i, "b": f"x{i}"} for i in range(5)]


def records_of(sources):
    out = []
    for s_idx, index, payload, nbytes in read_records(sources):
        assert nbytes > 0
        out.append((sources[s_idx].where(index), json.loads(payload) if isinstance(payload, bytes) else payload))
    return out


def test_kinds_positions_and_order(tmp_path):
    (tmp_path / "1.jsonl").write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    (tmp_path / "2.json").write_text(json.dumps(RECORDS[2:4], indent=1))
    pq.write_table(pa.Table.from_pylist(RECORDS[4:]), tmp_path / "3.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    sources = find_sources(str(tmp_path))
    assert [s.kind for s in sources] == ["jsonl", "json", "parquet"]
    got = records_of(sources)
    assert [r for _, r in got] == RECORDS
    assert [w.replace(str(tmp_path) + "/", "") for w, _ in got] == [
        "1.jsonl:1", "1.jsonl:3", "2.json: item 1", "2.json: item 2", "3.parquet: row 1"]  # blank line 2 skipped
    assert first_record_columns(sources[2]) == {"a", "b"} == first_record_columns(sources[0])


def test_json_extension_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert [r for _, r in records_of(find_sources(str(path)))] == RECORDS


def test_glob_and_missing_inputs(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps(RECORDS[i]) + "\n")
    assert [r for _, r in records_of(find_sources(str(tmp_path / "part*.jsonl")))] == RECORDS[:3]
    with pytest.raises(DataError, match="--input .*: no input files found"):
        find_sources(str(tmp_path / "nothing*.jsonl"))


def test_bad_json_array_files_name_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"a": 1},\n{"a": 2,,}\n]')
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        list(read_records(find_sources(str(path))))
    path.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(DataError, match=f"{path}: not valid UTF-8"):
        list(read_records(find_sources(str(path))))


def save_like_datasets(directory, shards):
    """A folder laid out as datasets' Dataset.save_to_disk writes it (datasets is not a dependency):
    data-0000i-of-0000n.arrow Arrow IPC streams, state.json listing them in order, dataset_info.json."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, records in zip(names, shards):
        table = pa.Table.from_pylist(records)
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):
                writer.write_batch(batch)
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": "train"}))
    (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return directory


def test_saved_datasets_folder_is_read_in_its_file_order(tmp_path):
    folder = save_like_datasets(tmp_path / "ds" / "train", [RECORDS[:3], RECORDS[3:]])
    (folder / "data-00001-of-00002.arrow").rename(folder / "a-first-by-name.arrow")  # order comes from state.json
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"][1]["filename"] = "a-first-by-name.arrow"
    (folder / "state.json").write_text(json.dumps(state))
    sources = find_sources(str(folder))
    assert [s.kind for s in sources] == ["arrow", "arrow"]
    got = records_of(sources)
    assert [r for _, r in got] == RECORDS
    assert got[3][0] == f"{folder}/a-first-by-name.arrow: row 1" and first_record_columns(sources[0]) == {"a", "b"}
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DataError, match="is a DatasetDict saved with save_to_disk \\(splits \\['train'\\]\\); pass "
                                        "one split's folder, e.g. --input .*/ds/train"):
        find_sources(str(tmp_path / "ds"))


def test_arrow_file_format_is_read_too(tmp_path):
    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    assert [r for _, r in records_of(find_sources(str(tmp_path / "d.arrow")))] == RECORDS
    with pytest.raises(DataError, match="bad.arrow: not an Arrow IPC file"):
        list(read_records(find_sources(str(tmp_path / "bad.arrow"))))
