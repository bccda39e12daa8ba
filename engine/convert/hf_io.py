"""Reading and writing HF checkpoint folders: lazy safetensors reads, sharded writes, tokenizer files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.convert.common import ConversionError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "qwen.tiktoken", "tokenizer.tiktoken",
)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some old checkpoints saved; recomputed by every model, never converted."""


class HFCheckpoint:
    """An HF folder: config.json plus safetensors (one file or an index), read one tensor at a time.

    Tensors are read lazily through safe_open (memory-mapped), so only the tensors of the
    unit being converted are ever in memory. Every read is checked against the shape the
    config implies, and `check_all_read` catches weights the config does not describe.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"--load-dir {self.path}: no config.json (not an HF model folder?)")
        self.config: dict = json.loads(config_path.read_text())
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            raise ConversionError(f"--load-dir {self.path}: no {SINGLE_FILE} or {INDEX_FILE}")
        missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise ConversionError(f"--load-dir {self.path}: {INDEX_FILE} lists missing files {', '.join(missing)}")
        self._weight_map = {k: v for k, v in weight_map.items() if not k.endswith(_IGNORED_SUFFIXES)}
        self._handles: dict[str, object] = {}
        self._read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def _handle(self, name: str):
        if name not in self._weight_map:
            raise ConversionError(f"{self.path}: tensor {name} is missing (config.json / weights mismatch?)")
        file = self._weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def _open(self, file: str):
        """safe_open, naming the file when it is not a whole safetensors file (mostly a download cut short)."""
        try:
            return safe_open(self.path / file, framework="pt")
        except SafetensorError as err:
            raise ConversionError(f"--load-dir {self.path}: {file} is truncated or corrupt ({err}); "
                                  "download it again") from None

    def dtype_name(self, name: str) -> str:
        """Stored dtype of a tensor without reading it: fp32, bf16, fp16 (or safetensors' own name)."""
        stored = self._handle(name).get_slice(name).get_dtype()
        return {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(stored, stored)

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        file = self._weight_map.get(name)
        tensor = self._handle(name).get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(
                f"{self.path / file}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(shape)}"
            )
        self._read.add(name)
        return tensor

    def skip(self, name: str) -> None:
        """Marks a tensor that is deliberately not converted (a tied lm_head copy)."""
        self._read.add(name)

    def check_all_read(self) -> None:
        unread = sorted(set(self._weight_map) - self._read)
        if unread:
            shown = ", ".join(unread[:5]) + (" ..." if len(unread) > 5 else "")
            raise ConversionError(f"{self.path}: {len(unread)} tensors not described by config.json: {shown}")


class HFShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (one oversized tensor gets its own).

    Only one shard is buffered at a time. Shards are renamed model-0000K-of-0000N at the end,
    when N is known; a single shard is model.safetensors without an index, as transformers writes.
    """

    def __init__(self, path: str | Path, max_bytes: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._buffer and self._buffer_bytes + size > self.max_bytes:
                self._flush()
            self._buffer[name] = tensor
            self._buffer_bytes += size
            self._total_bytes += size

    def _flush(self) -> None:
        save_safetensors(self._buffer, self.path / f".shard{len(self._shards)}")
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.path / ".shard0", self.path / SINGLE_FILE)
            return
        weight_map = {}
        for index, names in enumerate(self._shards):
            file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.path / f".shard{index}", self.path / file)
            weight_map.update(dict.fromkeys(names, file))
        index_doc = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.path / INDEX_FILE).write_text(json.dumps(index_doc, indent=2) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file` (pt metadata, as transformers writes), then the mode `open` gives a file.

    safetensors 0.8 creates its files 0600 whatever the umask: teammates on a shared cluster could
    not read a converted model. The umask is read by setting it and setting it back, as Python offers
    no other way; nothing else in a conversion creates files meanwhile.
    """
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0o077)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() or any((path / name).is_file() for name in TOKENIZER_FILES)


def copy_tokenizer(source: str | Path, target: Path) -> list[str]:
    """Copies a tokenizer folder's files (or a single tokenizer file) into `target`; returns the names."""
    source = Path(source)
    if source.is_file():
        shutil.copy2(source, target / source.name)
        return [source.name]
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    return copied
