"""Checkpoint checksums (iter_*/manifest.json) and failed writes, on the shared layout code that training and
the converters both use."""

from __future__ import annotations

import errno
import hashlib
import json
import logging

import pytest
import torch

from engine.checkpoint import manifest
from engine.checkpoint.layout import CheckpointError, load_rank_state, publish, rank_file, write_rank_state
from engine.convert.common import ConversionError
from engine.convert.mg_io import MegatronCheckpoint

WEIGHTS = torch.arange(4096, dtype=torch.float32)


def save(root, iteration: int = 1, tp: int = 1) -> None:
    for tp_rank in range(tp):
        write_rank_state(root, iteration, tp_rank, 0, 1, {"model": {"w": WEIGHTS + tp_rank}})
    publish(root, iteration)


def flip_a_weight_byte(path) -> None:
    data = bytearray(path.read_bytes())
    offset = data.find(WEIGHTS.numpy().tobytes()[:64]) + 100  # inside the tensor's bytes: torch.load still reads it
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_publish_writes_a_manifest_of_every_file(tmp_path):
    save(tmp_path, tp=2)
    iteration = tmp_path / "iter_0000001"
    listed = json.loads((iteration / "manifest.json").read_text())
    assert listed["algorithm"] == "sha256"
    assert sorted(listed["files"]) == ["mp_rank_00/model_optim_rng.pt", "mp_rank_01/model_optim_rng.pt"]
    for name, entry in listed["files"].items():
        data = (iteration / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert not list(iteration.rglob("*.sha256"))  # the writers' digests were merged


def test_a_flipped_byte_fails_the_load_naming_the_file(tmp_path):
    save(tmp_path)
    path = rank_file(tmp_path / "iter_0000001", 0, 0, 1)
    flip_a_weight_byte(path)
    with pytest.raises(CheckpointError) as err:
        load_rank_state(tmp_path, 1, 0, 0, 1)
    assert str(err.value).startswith(f"{path} does not match its checksum in {tmp_path / 'iter_0000001'}/manifest.json")
    assert "--no-verify-checkpoint" in str(err.value)
    # Unverified, the corruption loads without a word: what the manifest is for.
    loaded = load_rank_state(tmp_path, 1, 0, 0, 1, verify=False)["model"]["w"]
    assert (loaded != WEIGHTS).sum() == 1


def test_a_checkpoint_without_manifest_loads_with_an_info_line(tmp_path, caplog):
    save(tmp_path)
    (tmp_path / "iter_0000001" / "manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger="engine.checkpoint.layout"):
        assert torch.equal(load_rank_state(tmp_path, 1, 0, 0, 1)["model"]["w"], WEIGHTS)
    assert "has no manifest.json (saved without checksums): loading it unverified" in caplog.text


def test_the_converters_reader_verifies_the_rank_files(tmp_path):
    args = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 2, "kv_channels": 4,
            "ffn_hidden_size": 16, "vocab_size": 16, "untie_embeddings_and_output_weights": True}
    model = {"embedding.word_embeddings.weight": torch.zeros(16, 8), "decoder.layers.0.mlp.linear_fc2.weight": WEIGHTS,
             "decoder.final_layernorm.weight": torch.ones(8), "output_layer.weight": torch.zeros(16, 8)}
    write_rank_state(tmp_path, 1, 0, 0, 1, {"model": model, "args": args})
    publish(tmp_path, 1)
    assert MegatronCheckpoint(tmp_path).layout.num_layers == 1
    path = rank_file(tmp_path / "iter_0000001", 0, 0, 1)
    flip_a_weight_byte(path)
    with pytest.raises(ConversionError, match=f"^{path} does not match its checksum"):
        MegatronCheckpoint(tmp_path)


class FullDisk:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_names_the_directory_free_space_and_size_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "open", lambda path, mode: FullDisk(open(path, mode), room=1000), raising=False)
    with pytest.raises(CheckpointError) as err:
        write_rank_state(tmp_path, 5, 0, 0, 1, {"model": {"w": torch.zeros(1024, 1024)}})  # 4 MiB
    path = rank_file(tmp_path / ".staging_iter_0000005", 0, 0, 1)
    message = str(err.value)
    assert message.startswith(f"could not write {path} (No space left on device): ")
    assert f"free on the file system of {path.parent}, the file needs about 4.0 MiB" in message
    assert message.endswith("free space there or save elsewhere") and "\n" not in message
    assert not path.exists()
