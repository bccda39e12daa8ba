"""Converted checkpoints get the permissions any folder the user makes gets: readable by teammates.

The output is staged in a hidden directory and renamed; that directory must not be private (0700,
as tempfile.mkdtemp makes it), and an existing empty --save-dir the user made keeps its mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.convert.common import ConvertConfig, staged_output
from engine.convert.hf_io import save_safetensors
from engine.convert.run import run_conversion
from tests.e2e.convert_assets import build_tiny_hf_model


@pytest.fixture
def umask():
    """Sets the process umask for the test (the value the user's shell would have), then restores it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                       (0o002, 0o775, 0o664)])
def test_new_save_dir_follows_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    umask(mask)
    out = tmp_path / "shared" / "out"
    with staged_output(out) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "weights.bin").write_bytes(b"x")
    assert _mode(out) == dir_mode
    assert _mode(out / "sub") == dir_mode and _mode(out / "sub" / "weights.bin") == file_mode
    assert _mode(out.parent) == dir_mode  # a missing parent is made like mkdir -p would


@pytest.mark.parametrize("existing", [0o775, 0o711, 0o2770])
def test_existing_empty_save_dir_keeps_its_mode(tmp_path, umask, existing):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(existing)
    with staged_output(out) as staging:
        (staging / "weights.bin").write_bytes(b"x")
    assert _mode(out) == existing
    assert (out / "weights.bin").read_bytes() == b"x"


def test_a_failed_body_leaves_nothing_and_the_empty_dir_untouched(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o775)
    with pytest.raises(RuntimeError):
        with staged_output(out) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("conversion failed")
    assert _mode(out) == 0o775 and not any(out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_a_real_conversion_is_readable_by_the_group_and_others(tmp_path, umask):
    hf = build_tiny_hf_model("llama2", tmp_path / "hf")
    mg, back = tmp_path / "mg", tmp_path / "back"
    run_conversion(ConvertConfig("hf", "mg", str(hf), str(mg), 2, 2))
    run_conversion(ConvertConfig("mg", "hf", str(mg), str(back), max_shard_size=100_000))
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    for root in (mg, back):
        paths = [root, *root.rglob("*")]
        assert len(paths) > 3
        wrong = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in paths
                 if _mode(p) != (0o755 if p.is_dir() else 0o644)}
        assert not wrong, f"modes other than 0755 (dirs) / 0644 (files): {wrong}"


def test_safetensors_files_follow_the_umask(tmp_path, umask):
    """safetensors itself writes 0600; the PEFT adapter export and the HF shards go through this helper."""
    umask(0o027)
    save_safetensors({"w": torch.arange(4.0)}, tmp_path / "adapter_model.safetensors")
    assert _mode(tmp_path / "adapter_model.safetensors") == 0o640
    assert load_file(tmp_path / "adapter_model.safetensors")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
