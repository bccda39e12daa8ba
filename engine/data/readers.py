"""Input readers: JSONL, JSON array, parquet and Arrow files, or a directory/glob of them.

A directory that HF ``datasets`` wrote with ``save_to_disk`` (``state.json`` listing its
``data-*.arrow`` files, Arrow IPC streams) is read with pyarrow alone, in its own file order.

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

EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
ARROW_FILE_MAGIC = b"ARROW1"
"""First bytes of the Arrow IPC *file* format; ``datasets`` writes the *stream* format, which lacks them."""


class DataError(Exception):
    """Bad input; the message names file, line (or item/row) and field."""


@dataclass(frozen=True)
class Source:
    """One input file and how to name a position in it."""

    path: str
    kind: str
    """``jsonl``, ``json`` (an array), ``parquet`` or ``arrow``."""

    @property
    def unit(self) -> str:
        return {"jsonl": "line", "json": "item", "parquet": "row", "arrow": "row"}[self.kind]

    def where(self, index: int) -> str:
        return f"{self.path}:{index}" if self.kind == "jsonl" else f"{self.path}: {self.unit} {index}"


def _kind(path: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as f:  # a .json file may hold one array or one object per line
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def _saved_dataset_files(directory: str) -> list[str] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder in their order, or None if it is not one."""
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
        try:
            with open(os.path.join(directory, "dataset_dict.json"), encoding="utf-8") as f:
                splits = json.load(f).get("splits", [])
        except (ValueError, AttributeError):
            splits = []
        example = os.path.join(directory, splits[0] if splits else "train")
        raise DataError(f"--input {directory!r} is a DatasetDict saved with save_to_disk (splits {splits}); "
                        f"pass one split's folder, e.g. --input {example}")
    state_file = os.path.join(directory, "state.json")
    if not os.path.isfile(state_file):
        return None
    try:
        with open(state_file, encoding="utf-8") as f:
            files = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_file}: not a datasets state.json with a _data_files list ({e!r})") from None
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise DataError(f"--input {directory!r}: state.json lists {missing} but they are not in the folder")
    return [os.path.join(directory, name) for name in files]


def find_sources(spec: str) -> list[Source]:
    """Files named by --input: a file, a directory (its data files, or a saved ``datasets`` folder) or a glob."""
    saved = _saved_dataset_files(spec) if os.path.isdir(spec) else None
    if saved is not None:
        if not saved:
            raise DataError(f"--input {spec!r}: the saved dataset lists no data files")
        return [Source(p, "arrow") for p in saved]
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
        elif source.kind == "arrow":
            row = 0
            for batch, nbytes in _arrow_batches(source.path)[1]:
                share = nbytes // max(batch.num_rows, 1)
                for record in batch.to_pylist():
                    row += 1
                    yield s_idx, row, record, share
        else:
            pf = pq.ParquetFile(source.path)
            share = os.path.getsize(source.path) // max(pf.metadata.num_rows, 1)
            row = 0
            for batch in pf.iter_batches(batch_size=4096):
                for record in batch.to_pylist():
                    row += 1
                    yield s_idx, row, record, share


def _arrow_batches(path: str):
    """(schema, iterator of (record batch, bytes it took)) of an Arrow IPC file, in the stream format
    (what ``datasets`` writes) or the file format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            size = os.path.getsize(path) // max(reader.num_record_batches, 1)
            return reader.schema, ((reader.get_batch(i), size) for i in range(reader.num_record_batches))
        source.seek(0)
        stream = pa.ipc.open_stream(source)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file ({e})") from None

    def batches():
        position = source.tell()
        for batch in stream:
            yield batch, source.tell() - position
            position = source.tell()

    return stream.schema, batches()


def first_record_columns(source: Source) -> set[str] | None:
    """Column names of a file (parquet schema, or the first parsable record), for --map-keys checks."""
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(source.path).names)
    if source.kind == "arrow":
        return set(_arrow_batches(source.path)[0].names)
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
