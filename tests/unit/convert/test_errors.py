"""Bad input gives one clear error naming the path or flag, and leaves no output directory behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.convert.common import ConversionError, ConvertConfig
from engine.convert.run import run_conversion
from tests.e2e.convert_assets import build_tiny_hf_model

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_hf_model("llama2", tmp_path_factory.mktemp("hf") / "llama2")


@pytest.fixture
def hf_copy(tiny_hf, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_hf, tmp_path / "hf"))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _assert_fails(tmp_path: Path, config: ConvertConfig, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        run_conversion(config)
    out = Path(config.save_dir)
    assert not out.exists() or not any(out.iterdir()), "partial output left behind"
    assert not list(out.parent.glob(f".{out.name}.staging-*")), "staging directory left behind"


def test_missing_config_json(hf_copy, tmp_path):
    (hf_copy / "config.json").unlink()
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")), "no config.json")


def test_missing_weight_file(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")), "no model.safetensors")


def test_index_naming_a_missing_shard(hf_copy, tmp_path):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")),
                  "missing files model-00001-of-00002")


def test_config_weights_shape_mismatch(hf_copy, tmp_path):
    _edit_config(hf_copy, intermediate_size=128)
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out"), 1, 2),
                  r"gate_proj.weight has shape \(96, 64\), config.json implies \(128, 64\)")


def test_weights_the_config_does_not_describe(hf_copy, tmp_path):
    _edit_config(hf_copy, num_hidden_layers=3)
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")),
                  "tensors not described by config.json: model.layers.3")


@pytest.mark.parametrize(("tp", "pp", "layers", "match"), [
    (8, 1, None, r"--num-attention-heads \(4\) must be divisible by --target-tensor-parallel-size \(8\)"),
    (3, 1, None, r"must be divisible by --target-tensor-parallel-size \(3\)"),
    (1, 3, None, r"--num-layers \(4\) must be divisible by --target-pipeline-parallel-size \(3\)"),
    (1, 2, (1, 2), r"--num-layer-list 1,2 sums to 3, not --num-layers \(4\)"),
])
def test_layout_that_does_not_fit_the_model(hf_copy, tmp_path, tp, pp, layers, match):
    config = ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out"), tp, pp, num_layer_list=layers)
    _assert_fails(tmp_path, config, match)


def test_expert_layout_of_a_dense_model(hf_copy, tmp_path):
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out"), 2, 1,
                                          target_expert_tensor_parallel_size=1),
                  "--target-expert-parallel-size and --target-expert-tensor-parallel-size need --num-experts")


def test_tp_not_dividing_query_groups(hf_copy, tmp_path):
    _edit_config(hf_copy, num_key_value_heads=2)  # shapes now mismatch too, but the layout is checked first
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out"), 4, 1),
                  r"--num-query-groups \(2\) must be divisible by --target-tensor-parallel-size \(4\)")


def test_unsupported_family_lists_the_supported_ones(hf_copy, tmp_path):
    _edit_config(hf_copy, model_type="gpt2")
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")),
                  "unsupported HF model_type 'gpt2'; supported: llama2")


def test_non_empty_save_dir_is_left_alone(hf_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        run_conversion(ConvertConfig("hf", "mg", str(hf_copy), str(out)))
    assert (out / "keep.txt").read_text() == "mine"


def test_megatron_input_errors(hf_copy, tmp_path):
    _assert_fails(tmp_path, ConvertConfig("mg", "hf", str(hf_copy), str(tmp_path / "o1")),
                  "no latest_checkpointed_iteration.txt")
    mg = tmp_path / "mg"
    run_conversion(ConvertConfig("hf", "mg", str(hf_copy), str(mg), 2, 2))
    _assert_fails(tmp_path, ConvertConfig("mg", "hf", str(mg), str(tmp_path / "o2"), load_iteration=5),
                  "iteration 5 is not saved")
    shutil.rmtree(mg / "iter_0000001" / "mp_rank_01_001")
    _assert_fails(tmp_path, ConvertConfig("mg", "hf", str(mg), str(tmp_path / "o3")), "missing mp_rank_01_001")


def test_tokenizer_is_recorded_from_the_hf_folder(hf_copy, tmp_path):
    (hf_copy / "tokenizer.json").write_text("{}")
    run_conversion(ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "mg")))
    state = torch.load(tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert state["args"]["tokenizer"] == str(hf_copy.resolve())


def _convert_ckpt_main():
    sys.path.insert(0, str(REPO / "tools" / "checkpoint"))
    try:
        from convert_ckpt import main
    finally:
        sys.path.pop(0)
    return main


def test_cli_prints_one_error_line_and_exits_non_zero(tmp_path):
    result = subprocess.run(
        [sys.executable, "tools/checkpoint/convert_ckpt.py", "--model-type", "GPT", "--load-model-type", "hf",
         "--save-model-type", "mg", "--load-dir", str(tmp_path / "nothing"), "--save-dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("convert_ckpt.py: error: --load-dir")
    assert not (tmp_path / "out").exists()


def test_cli_converts_and_prints_the_pretrain_flags(tiny_hf, tmp_path, capsys):
    code = _convert_ckpt_main()(["--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg",
                 "--load-dir", str(tiny_hf), "--save-dir", str(tmp_path / "mg"),
                 "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                 "--num-layer-list", "3,1", "--model-type-hf", "llama2", "--params-dtype", "bf16"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--num-layers 4" in printed and "--tensor-model-parallel-size 2" in printed and "--bf16" in printed
    assert (tmp_path / "mg" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()


def test_cli_reports_an_os_error_in_one_line(tiny_hf, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = _convert_ckpt_main()(["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(tiny_hf),
                                 "--save-dir", str(blocker / "out")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("convert_ckpt.py: error: [Errno") and str(blocker) in err[-1]


def test_staging_left_by_a_killed_conversion_is_removed_and_a_live_ones_kept(tiny_hf, tmp_path):
    host = socket.gethostname()
    dead = _exited_pid()
    abandoned = tmp_path / f".mg.staging-{host}-{dead}-0000"
    running = tmp_path / f".mg.staging-{host}-{os.getpid()}-1111"
    elsewhere = tmp_path / f".mg.staging-other-node-{dead}-2222"
    for folder in (abandoned, running, elsewhere):
        (folder / "iter_0000001").mkdir(parents=True)
    run_conversion(ConvertConfig("hf", "mg", str(tiny_hf), str(tmp_path / "mg")))
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").is_file()
    assert not abandoned.exists() and running.is_dir() and elsewhere.is_dir()


def _exited_pid() -> int:
    """The pid of a process that has finished (and been reaped), as a killed conversion's is."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _split_into_two_shards(folder: Path) -> list[str]:
    """Rewrites the model as two safetensors shards with an index, as large models are published."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for file, half in zip(files, halves):
        save_file({n: tensors[n] for n in half}, folder / file, metadata={"format": "pt"})
    weight_map = {n: file for file, half in zip(files, halves) for n in half}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.mark.parametrize("keep", [0.5, 0.999, 4], ids=["half", "last-bytes-missing", "header-cut"])
def test_truncated_single_file_names_it(hf_copy, tmp_path, keep):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")),
                  f"--load-dir {hf_copy}: model.safetensors is truncated or corrupt .*download it again")


def test_truncated_shard_names_it(hf_copy, tmp_path):
    files = _split_into_two_shards(hf_copy)
    shard = hf_copy / files[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    _assert_fails(tmp_path, ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")),
                  f"{files[1]} is truncated or corrupt")


def test_two_whole_shards_convert(hf_copy, tmp_path):
    """The shard split above is a valid model: the error comes from the truncation alone."""
    _split_into_two_shards(hf_copy)
    run_conversion(ConvertConfig("hf", "mg", str(hf_copy), str(tmp_path / "out")))
    assert (tmp_path / "out" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()
