"""Checksums of a checkpoint iteration's files: `iter_XXXXXXX/manifest.json`.

A rank file that was truncated by a copy, flipped by a bad disk or replaced by hand otherwise loads as
wrong weights or fails deep inside torch.load. Each file is hashed while it is written (no second
read), its digest is left beside it in the staging directory as `<file>.sha256` (one per writer, so
ranks need not communicate), and the process that publishes the iteration merges the digests into one
manifest.json before the directory becomes visible. Loaders compare each file with it (layout.py).

```
{"algorithm": "sha256", "files": {"mp_rank_00/model_optim_rng.pt": {"sha256": "...", "bytes": 123}}}
```
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

MANIFEST_FILE = "manifest.json"
DIGEST_SUFFIX = ".sha256"
_CHUNK = 1 << 24


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes the bytes torch.save passes through it.

    torch.save turns an exception raised by a Python file's write() into an unspecific RuntimeError,
    so the first OSError (ENOSPC, EIO, ...) is kept for the caller to report.
    """

    def __init__(self, file):
        super().__init__()
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.sha256.update(data)
        self.bytes += written
        return written


def save_hashed(obj, path: Path) -> None:
    """torch.save(obj, path), leaving `path.sha256` with the file's digest and size. Raises the OSError
    of a failed write (disk full, I/O error) rather than torch's RuntimeError about it."""
    with open(path, "wb") as file:
        writer = HashingWriter(file)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
    _leave_digest(path, writer.sha256.hexdigest(), writer.bytes)


def record_digest(path: Path) -> None:
    """Leaves the digest of a file that other code wrote (megatron-core's distributed optimizer state),
    read back once."""
    _leave_digest(path, file_sha256(path), path.stat().st_size)


def _leave_digest(path: Path, sha256: str, size: int) -> None:
    Path(f"{path}{DIGEST_SUFFIX}").write_text(json.dumps({"sha256": sha256, "bytes": size}))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Merges the digests left in `directory` into its manifest.json; a file without one is hashed now."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if path.name.endswith(DIGEST_SUFFIX) or path.name == MANIFEST_FILE:
            continue
        left = Path(f"{path}{DIGEST_SUFFIX}")
        if left.is_file():
            files[path.relative_to(directory).as_posix()] = json.loads(left.read_text())
            left.unlink()
        else:
            files[path.relative_to(directory).as_posix()] = {"sha256": file_sha256(path),
                                                             "bytes": path.stat().st_size}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST_FILE)


def read_manifest(directory: Path) -> dict | None:
    """The `files` table of `directory`'s manifest.json, or None for a checkpoint saved without one."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["files"]
