"""The launch scripts under examples/mcore/ stay valid: every command they run goes through the project's parsers.

Each script is run with DRY_RUN=1: `run` (examples/mcore/common.sh) then prints each command as one
shell-quoted line instead of executing it, after bash has expanded the script's own defaults. The lines
are split with `shlex` and handed to the parser of the program they call:
- pretrain_dpo.py: torchrun's own parser gives the world size (nproc x nnodes), then `pretrain_dpo.py
  --validate-only` (parse + config sections + `validate()` for WORLD_SIZE ranks, nothing built);
- tools/checkpoint/convert_ckpt.py: its `build_parser()` and `ConvertConfig` (no conversion);
- preprocess_data.py: `add_preprocess_args`, the prompt type and the handler with its --map-keys.
The scripts must also fit together (data prefix, checkpoint directories, TP/PP, sequence length), and
the model flags must equal what the converter derives from each model's published HF config.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
from dataclasses import MISSING, asdict
from pathlib import Path

import pytest

from engine.arguments import DataConfig, ModelConfig, TokenizerConfig, build_parser, config_from_args, validate
from engine.data.handlers import build_handler
from engine.data.preprocess import PreprocessConfig, add_preprocess_args
from engine.data.templates import get_template
from engine.formats import OUTPUT_KEYS, UNPAIRED_KEYS, output_path_prefix
from engine.options import declared_fields
from engine.model.families import get_family, model_args, pretrain_flags

REPO = Path(__file__).resolve().parents[2]
MCORE = REPO / "examples" / "mcore"
SCRIPTS = sorted(MCORE.glob("*/*.sh"))
KINDS = ("data_convert_{}_pairwise.sh", "ckpt_convert_{}_hf2mcore.sh", "ckpt_convert_{}_mcore2hf.sh",
         "dpo_{}_full_ptd.sh", "dpo_{}_lora_ptd.sh")
KTO_KINDS = ("data_convert_{}_unpaired.sh", "kto_{}_full_ptd.sh")
"""KTO's scripts, for one model of each dense family (`KTO_MODELS`), beside the DPO ones."""
PROGRAMS = {"pretrain_dpo.py": "pretrain_dpo.py", "preprocess_data.py": "preprocess_data.py",
            "convert_ckpt.py": "tools/checkpoint/convert_ckpt.py"}

# Published config.json values of each model (huggingface.co/<repo>/blob/main/config.json), as the
# converter reads them: the scripts' MODEL_ARGS must equal the flags it derives from these.
_LLAMA31_ROPE = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
HF_CONFIGS = {
    ("llama3", "llama3_8b"): dict(  # meta-llama/Llama-3.1-8B-Instruct
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, vocab_size=128256, tie_word_embeddings=False, **_LLAMA31_ROPE),
    ("llama3", "llama3_70b"): dict(  # meta-llama/Llama-3.1-70B-Instruct
        model_type="llama", num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, vocab_size=128256, tie_word_embeddings=False, **_LLAMA31_ROPE),
    ("llama2", "llama2_7b"): dict(  # meta-llama/Llama-2-7b-chat-hf
        model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, vocab_size=32000, tie_word_embeddings=False),
    ("mistral", "mistral_7b"): dict(  # mistralai/Mistral-7B-Instruct-v0.3
        model_type="mistral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-5, vocab_size=32768, tie_word_embeddings=False),
    ("qwen2", "qwen25_7b"): dict(  # Qwen/Qwen2.5-7B-Instruct
        model_type="qwen2", num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, vocab_size=152064, tie_word_embeddings=False),
    ("qwen2", "qwen25_0point5b"): dict(  # Qwen/Qwen2.5-0.5B-Instruct
        model_type="qwen2", num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=True),
    ("qwen3", "qwen3_8b"): dict(  # Qwen/Qwen3-8B
        model_type="qwen3", num_hidden_layers=36, hidden_size=4096, intermediate_size=12288,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936, tie_word_embeddings=False),
    ("qwen3_moe", "qwen3_30b_a3b"): dict(  # Qwen/Qwen3-30B-A3B
        model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936,
        tie_word_embeddings=False),
    ("qwen3_moe", "qwen3_235b_a22b"): dict(  # Qwen/Qwen3-235B-A22B
        model_type="qwen3_moe", num_hidden_layers=94, hidden_size=4096, intermediate_size=12288,
        moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, vocab_size=151936,
        tie_word_embeddings=False),
    ("mixtral", "mixtral_8x7b"): dict(  # mistralai/Mixtral-8x7B-Instruct-v0.1
        model_type="mixtral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
        num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5, vocab_size=32000,
        tie_word_embeddings=False, sliding_window=None),
}
MODELS = {key: family for family, key in HF_CONFIGS}
KTO_MODELS = ("llama3_8b", "llama2_7b", "mistral_7b", "qwen25_7b", "qwen3_8b")
FAMILY_DIRS = {"llama3": "llama3", "llama2": "llama2", "mistral": "mistral", "qwen2": "qwen25", "qwen3": "qwen3",
               "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}
RM_KIND = "rm_{}_full_ptd.sh"
RM_MODELS = ("llama3_8b", "llama2_7b", "mistral_7b", "qwen25_7b", "qwen3_8b")
"""One reward-model (--stage rm) script per dense family, beside that model's DPO scripts."""


def _script(key: str, kind: str) -> Path:
    (path,) = [p for p in SCRIPTS if p.name == kind.format(key)]
    return path


def dry_run(script: Path, **env: str) -> list[list[str]]:
    """The commands `script` would run, as argv lists, with its defaults (plus `env`) expanded by bash."""
    clean = {"PATH": os.environ["PATH"], "DRY_RUN": "1", **env}
    result = subprocess.run(["bash", str(script)], env=clean, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{script.name} failed under DRY_RUN=1:\n{result.stderr}"
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def entry(commands: list[list[str]], program: str) -> tuple[list[str], list[str]]:
    """(launcher argv up to the program, the program's own flags) of the one command that calls `program`."""
    found = [(argv[:i], token, argv[i + 1:]) for argv in commands for i, token in enumerate(argv)
             if Path(token).name == program]
    assert len(found) == 1, f"expected one command running {program}, got {commands}"
    launcher, path, flags = found[0]
    assert Path(path).resolve() == (REPO / PROGRAMS[program]).resolve(), path
    return launcher, flags


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _world_size(launcher: list[str]) -> tuple[int, argparse.Namespace]:
    from torch.distributed.run import get_args_parser

    assert Path(launcher[0]).name == "torchrun", launcher
    args = get_args_parser().parse_args(launcher[1:] + ["pretrain_dpo.py"])
    return int(args.nproc_per_node) * int(args.nnodes), args


def _training_flags(flags: list[str]) -> argparse.Namespace:
    """The training flags, parsed by the training parser (an unknown flag fails the test)."""
    return build_parser().parse_args(flags)


def _dpo(key: str, kind: str, **env: str) -> tuple[list[str], list[str]]:
    return entry(dry_run(_script(key, kind), **env), "pretrain_dpo.py")


# -- the set of scripts ----------------------------------------------------------------------------------


def test_every_model_has_its_five_scripts_and_nothing_else():
    expected = {f"{FAMILY_DIRS[MODELS[key]]}/{kind.format(key)}" for key in MODELS for kind in KINDS}
    expected |= {f"{FAMILY_DIRS[MODELS[key]]}/{kind.format(key)}" for key in KTO_MODELS for kind in KTO_KINDS}
    dense = {family for family in FAMILY_DIRS if not get_family(family).moe}
    assert {MODELS[key] for key in KTO_MODELS} == dense, "one KTO script per dense family"
    expected |= {f"{FAMILY_DIRS[MODELS[key]]}/{RM_KIND.format(key)}" for key in RM_MODELS}
    assert {MODELS[key] for key in RM_MODELS} == dense  # every dense family
    found = {f"{p.parent.name}/{p.name}" for p in SCRIPTS}
    assert found == expected


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_and_runs_commands_through_run(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"' in text
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert dry_run(script), f"{script.name} prints no command under DRY_RUN=1"


# -- training scripts: pretrain_dpo.py --validate-only for the script's world size ---------------------

DPO_SCRIPTS = [p for p in SCRIPTS if p.name.startswith(("dpo_", "kto_"))]
"""The training scripts (DPO and KTO: the stage is the name's first word)."""


def _make_inputs(flags: list[str], root: Path) -> None:
    """Empty stand-ins, under `root`, for the checkpoints and shards the flags name: --validate-only
    checks that a start would find them."""
    args = build_parser().parse_args(flags)
    for directory in (args.load, getattr(args, "ref_model", None), getattr(args, "lora_load", None)):
        if directory:
            (root / directory).mkdir(parents=True, exist_ok=True)
    keys = UNPAIRED_KEYS if getattr(args, "stage", None) == "kto" else OUTPUT_KEYS
    for prefix in DataConfig(args.data_path).prefixes_and_weights[0]:
        for key in keys:
            for ext in (".bin", ".idx"):
                path = root / (output_path_prefix(prefix, key) + ext)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()


def _validate_only(flags: list[str], world_size: int, monkeypatch, capsys, root: Path) -> dict:
    """Runs `pretrain_dpo.py FLAGS --validate-only` in-process with WORLD_SIZE set, in `root` holding
    stand-ins for the inputs the flags name; returns the printed config."""
    pretrain = _load(REPO / "pretrain_dpo.py", "_launch_pretrain_dpo")
    _make_inputs(flags, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    try:
        code = pretrain.main(flags + ["--validate-only"])
    except SystemExit as err:  # argparse error: the message is on stderr
        pytest.fail(f"pretrain_dpo.py rejected the flags (exit {err.code}): {capsys.readouterr().err}")
    assert code == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("script", DPO_SCRIPTS, ids=lambda p: p.name)
def test_dpo_script_validates_for_its_world_size(script, monkeypatch, capsys, tmp_path):
    launcher, flags = entry(dry_run(script), "pretrain_dpo.py")
    world, torchrun = _world_size(launcher)
    config = _validate_only(flags, world, monkeypatch, capsys, tmp_path)
    # what the trainer needs beyond validate() (DPOTrainer refuses to start without them)
    assert config["data"]["data_path"] and config["checkpoint"]["load"] and config["training"]["train_iters"]
    assert config["checkpoint"]["save"] and config["preference"]["stage"] == script.name.split("_")[0]
    assert config["precision"]["bf16"] and config["parallel"]["use_distributed_optimizer"]
    tp, pp = config["parallel"]["tensor_model_parallel_size"], config["parallel"]["pipeline_model_parallel_size"]
    assert config["parallel"]["sequence_parallel"] == (tp > 1)
    assert tp <= int(torchrun.nproc_per_node), "keep tensor parallelism inside a node"
    # torchrun itself exits 1 on any failure: each rank's own message must land in a file, and on the console
    assert (torchrun.redirects, torchrun.tee) == ("3", "3") and torchrun.log_dir
    assert config["training"]["global_batch_size"] % (config["training"]["micro_batch_size"] * world // (tp * pp)) == 0


@pytest.mark.parametrize("script", [p for p in DPO_SCRIPTS if "_full_" in p.name], ids=lambda p: p.name)
def test_dpo_script_takes_the_cluster_from_the_environment(script, monkeypatch, capsys, tmp_path):
    launcher, _ = entry(dry_run(script), "pretrain_dpo.py")
    default_nodes = _world_size(launcher)[1].nnodes
    nodes = 2 * int(default_nodes)
    launcher, flags = entry(dry_run(script, NNODES=str(nodes), NODE_RANK="1", MASTER_ADDR="10.1.2.3",
                                    MASTER_PORT="29600"), "pretrain_dpo.py")
    world, torchrun = _world_size(launcher)
    assert (world, torchrun.node_rank, torchrun.master_addr, torchrun.master_port) == (8 * nodes, 1, "10.1.2.3", 29600)
    _validate_only(flags, world, monkeypatch, capsys, tmp_path)  # twice the data-parallel size still divides the batch


@pytest.mark.parametrize("key", RM_MODELS)
def test_rm_script_validates_and_fits_the_models_other_scripts(key, monkeypatch, capsys, tmp_path):
    """The reward-model script: --stage rm for its world size, on the data, checkpoint and model flags of the
    model's data/convert scripts and its DPO full run (only the stage, its options and the output differ)."""
    launcher, flags = _dpo(key, RM_KIND)
    world, _ = _world_size(launcher)
    config = _validate_only(flags, world, monkeypatch, capsys, tmp_path)
    assert config["preference"]["stage"] == "rm" and config["preference"]["center_rewards_coefficient"] == 0.01
    dpo = _training_flags(_dpo(key, KINDS[3])[1])
    train = _training_flags(flags)
    same = ("load", "data_path", "seq_length", "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "global_batch_size", "micro_batch_size")
    assert {k: getattr(train, k) for k in same} == {k: getattr(dpo, k) for k in same}
    assert asdict(_model(train)) == asdict(_model(dpo)) and train.save != dpo.save


# -- converter and preprocessing scripts: their own parsers, nothing converted ------------------------


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name.startswith("ckpt_convert_")], ids=lambda p: p.name)
def test_convert_script_parses(script):
    convert = _load(REPO / "tools" / "checkpoint" / "convert_ckpt.py", "_launch_convert_ckpt")
    _, flags = entry(dry_run(script), "convert_ckpt.py")
    config = _convert_config(convert, flags)  # ConvertConfig validates itself
    direction = ("hf", "mg") if script.name.endswith("_hf2mcore.sh") else ("mg", "hf")
    assert (config.load_model_type, config.save_model_type) == direction
    if config.model_type_hf is not None:
        family = get_family(config.model_type_hf)
        assert not config.add_qkv_bias or family.qkv_bias


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name.startswith("data_convert_")], ids=lambda p: p.name)
def test_data_script_parses(script):
    _, flags = entry(dry_run(script), "preprocess_data.py")
    args = _preprocess_flags(flags)
    get_template(args.prompt_type, args.prompt_type_path)
    build_handler(args.handler_name, args.map_keys or None)
    assert args.tokenizer_type == "PretrainedFromHF" and args.tokenizer_name_or_path
    assert args.overwrite, "re-running the script must replace its own data set, not stop at it"
    assert args.unpair == script.name.endswith("_unpaired.sh")


# -- the scripts of one model fit together -------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(MODELS))
def test_model_scripts_fit_together(key):
    data = _preprocess_flags(entry(dry_run(_script(key, KINDS[0])), "preprocess_data.py")[1])
    convert = _load(REPO / "tools" / "checkpoint" / "convert_ckpt.py", "_launch_convert_ckpt")
    to_hf = _convert_config(convert, entry(dry_run(_script(key, KINDS[2])), "convert_ckpt.py")[1])
    for kind in KINDS[3:]:
        train = _training_flags(_dpo(key, kind)[1])
        tp, pp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size
        ep = getattr(train, "expert_model_parallel_size", 1)
        to_mg = _convert_config(convert, entry(dry_run(_script(key, KINDS[1]), TP=str(tp), PP=str(pp)),
                                               "convert_ckpt.py")[1])
        assert (to_mg.target_tensor_parallel_size, to_mg.target_pipeline_parallel_size) == (tp, pp)
        assert to_mg.target_expert_parallel_size == ep, f"{kind.format(key)} EP is not the hf2mcore EP"
        assert train.load == to_mg.save_dir, f"{kind.format(key)} --load is not the hf2mcore --save-dir"
        assert train.data_path == [data.output_prefix]
        assert train.seq_length == data.seq_length
        if kind == KINDS[3]:
            assert to_hf.load_dir == train.save
            default_mg = _convert_config(convert, entry(dry_run(_script(key, KINDS[1])), "convert_ckpt.py")[1])
            assert default_mg.save_dir == train.load, "hf2mcore's default layout is the full run's"


@pytest.mark.parametrize("key", KTO_MODELS)
def test_kto_scripts_fit_the_model_scripts(key):
    """The KTO run trains on its unpaired data script's output, from the full DPO run's converted checkpoint."""
    data = _preprocess_flags(entry(dry_run(_script(key, KTO_KINDS[0])), "preprocess_data.py")[1])
    train = _training_flags(_dpo(key, KTO_KINDS[1])[1])
    dpo = _training_flags(_dpo(key, KINDS[3])[1])
    assert train.data_path == [data.output_prefix] and train.seq_length == data.seq_length
    assert (train.load, train.tensor_model_parallel_size, train.pipeline_model_parallel_size) == \
        (dpo.load, dpo.tensor_model_parallel_size, dpo.pipeline_model_parallel_size)
    assert asdict(_model(train)) == asdict(_model(dpo)) and train.save != dpo.save


@pytest.mark.parametrize("key", sorted(MODELS))
def test_model_flags_equal_what_the_converter_prints(key):
    family = get_family(MODELS[key])
    printed = pretrain_flags(model_args(family, HF_CONFIGS[(MODELS[key], key)]))
    for kind in KINDS[3:]:
        train = _training_flags(_dpo(key, kind)[1])
        expected = config_from_args(build_parser().parse_args(printed + ["--seq-length", str(train.seq_length)]))
        assert asdict(_model(train)) == asdict(expected.model), kind.format(key)
        architecture = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
                        "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")
        moe = config_from_args(train).moe
        assert [getattr(moe, f) for f in architecture] == [getattr(expected.moe, f) for f in architecture], key


def _preprocess_flags(flags: list[str]) -> argparse.Namespace:
    """preprocess_data.py's flags with the declared defaults filled in (the tokenizer folder need not exist)."""
    args = add_preprocess_args(argparse.ArgumentParser()).parse_args(flags)
    for section in (PreprocessConfig, TokenizerConfig):
        for f in declared_fields(section):
            if not hasattr(args, f.name):
                setattr(args, f.name, f.default_factory() if f.default is MISSING else f.default)
    return args


def _convert_config(convert, flags: list[str]):
    return convert.config_from_args(convert.build_parser().parse_args(flags))


def _model(args: argparse.Namespace) -> ModelConfig:
    return config_from_args(args).model


def test_validate_only_catches_a_broken_layout(monkeypatch, capsys):
    """The check is not vacuous: the 70B script at TP 16 breaks the heads/TP rule."""
    _, flags = _dpo("llama3_70b", KINDS[3])
    flags[flags.index("--tensor-model-parallel-size") + 1] = "16"
    pretrain = _load(REPO / "pretrain_dpo.py", "_launch_pretrain_dpo")
    monkeypatch.setenv("WORLD_SIZE", "64")
    with pytest.raises(SystemExit):
        pretrain.main(flags + ["--validate-only"])
    assert "--num-query-groups (8) must be divisible by --tensor-model-parallel-size (16)" in capsys.readouterr().err


def test_dry_run_runs_nothing_and_a_real_run_runs_what_it_printed(tmp_path):
    """With DRY_RUN=1 no program starts; without it, `run` executes exactly the printed argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$0" "$@" > "{record}"\n')
    fake.chmod(0o755)
    script = _script("llama3_8b", KINDS[3])
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    printed = dry_run(script, **env)
    assert not record.exists()
    subprocess.run(["bash", str(script)], env={**env, "DRY_RUN": "0"}, check=True, timeout=30)
    executed = record.read_bytes().decode().split("\0")[:-1]
    assert [Path(executed[0]).name] + executed[1:] == printed[0]
