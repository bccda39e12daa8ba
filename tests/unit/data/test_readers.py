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
