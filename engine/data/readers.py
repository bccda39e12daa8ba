"""Input readers: JSONL, JSON array and parquet files, or a directory/glob of them.

Records come out in a fixed order (files sorted, then file order) with the
position an error message needs. JSONL lines stay raw bytes so that workers,
not the reading process, pay for UTF-8 decoding and JSON parsing.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator

EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(Exception):
    """Bad input; the message names file, line (or item/row) and field."""


@dataclass(frozen=True)
class Source:
    """One input file and how to name a position in it."""

    path: str
    kind: str
    """``jsonl``, ``json`` (an array) or ``parquet``."""

    @property
    def unit(self) -> str:
        return {"jsonl": "line", "json": "item", "parquet": "row"}[self.kind]

    def where(self, index: int) -> str:
        return f"{self.path}:{index}" if self.kind == "jsonl" else f"{self.path}: {self.unit} {index}"


def _kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as f:  # a .json file may hold one array or one object per line
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def find_sources(spec: str) -> list[Source]:
    """Files named by --input: a file, a directory (its data files) or a glob."""
    if os.path.isdir(spec):
        paths = [os.path.join(spec, n) for n in os.listdir(spec) if n.endswith(EXTENSIONS)]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = [p for p in glob.glob(spec) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"--input {spec!r}: no input files found (expected {', '.join(EXTENSIONS)})")
    return [Source(p, _kind(p)) for p in sorted(paths)]


def total_bytes(sources: list[Source]) -> int:
    return sum(os.path.getsize(s.path) for s in sources)


def _load_json_array(source: Source) -> list:
    try:
        with open(source.path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{source.path}: not valid UTF-8 (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{source.path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{source.path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def read_records(sources: list[Source]) -> Iterator[tuple[int, int, bytes | dict, int]]:
    """Yield ``(source index, line/item/row number from 1, raw line or record, bytes consumed)``."""
    import pyarrow.parquet as pq

    for s_idx, source in enumerate(sources):
        if source.kind == "jsonl":
            with open(source.path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield s_idx, lineno, line, len(line)
        elif source.kind == "json":
            records = _load_json_array(source)
            share = os.path.getsize(source.path) // max(len(records), 1)
            for i, record in enumerate(records, 1):
                yield s_idx, i, record, share
        else:
            pf = pq.ParquetFile(source.path)
            share = os.path.getsize(source.path) // max(pf.metadata.num_rows, 1)
            row = 0
            for batch in pf.iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield s_idx, row, record, share


def first_record_columns(source: Source) -> set[str] | None:
    """Column names of a file (parquet schema, or the first parsable record), for --map-keys checks."""
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(source.path).names)
    if source.kind == "json":
        records = _load_json_array(source)
        return set(records[0]) if records and isinstance(records[0], dict) else None
    with open(source.path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return None  # reported with its line number when processed
                return set(record) if isinstance(record, dict) else None
    return None
