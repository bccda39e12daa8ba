"""Flag parsing and cross-section validation: impossible layouts fail before any work."""

from __future__ import annotations

import pytest

from engine.arguments import ConfigError, build_parser, config_from_args, parse_args, validate

TINY = "--num-layers 4 --hidden-size 64 --num-attention-heads 8 --seq-length 32 --vocab-size 1000".split()


def config(extra: str = ""):
    return config_from_args(build_parser().parse_args(TINY + extra.split()))


def test_defaults_derive_from_the_model():
    cfg = config()
    assert cfg.model.ffn_hidden_size == 256
    assert cfg.model.num_query_groups == 8 and cfg.model.kv_channels == 8
    assert cfg.model.max_position_embeddings == 32
    validate(cfg, world_size=4)
    assert cfg.training.global_batch_size == 4  # micro 1 x DP 4


def test_padded_vocab_rounds_to_multiple_times_tp():
    cfg = config("--make-vocab-size-divisible-by 128")
    assert cfg.model.padded_vocab(1) == 1024
    assert cfg.model.padded_vocab(8) == 1024
    assert config("--make-vocab-size-divisible-by 100").model.padded_vocab(3) == 1200
    assert config("--padded-vocab-size 1100").model.padded_vocab(2) == 1100


@pytest.mark.parametrize(
    "extra, world, message",
    [
        ("--tensor-model-parallel-size 3", 3, r"--num-attention-heads \(8\) must be divisible by --tensor-model-parallel-size \(3\)"),
        ("--pipeline-model-parallel-size 3", 3, r"--num-layers \(4\) must be divisible by --pipeline-model-parallel-size \(3\)"),
        ("--group-query-attention --num-query-groups 2 --tensor-model-parallel-size 4", 4,
         r"--num-query-groups \(2\) must be divisible by --tensor-model-parallel-size \(4\)"),
        ("--micro-batch-size 2 --global-batch-size 6", 2,
         r"--global-batch-size \(6\) must be divisible by --micro-batch-size \(2\) x data-parallel size \(2"),
        ("--tensor-model-parallel-size 2", 3, r"world size 3 is not divisible"),
        ("--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --global-batch-size 3 "
         "--micro-batch-size 1", 2, r"interleaved schedule needs the number of micro-batches \(3\)"),
        ("--padded-vocab-size 999", 1, r"--padded-vocab-size \(999\) is smaller than --vocab-size \(1000\)"),
    ],
)
def test_validate_names_the_flags_and_the_rule(extra, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(extra), world_size=world)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--sequence-parallel", r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
        ("--bf16 --fp16", r"--bf16 and --fp16 are mutually exclusive"),
        ("--num-query-groups 2", r"--num-query-groups needs --group-query-attention"),
        ("--group-query-attention --num-query-groups 3", r"must be a multiple of --num-query-groups \(3\)"),
        ("--lr 1e-5 --min-lr 1e-4", r"--min-lr \(0.0001\) exceeds --lr"),
        ("--lr-warmup-fraction 0.1 --lr-warmup-iters 5", r"mutually exclusive"),
        ("--save-interval 10", r"--save-interval needs --save"),
        ("--seq-length 64 --max-position-embeddings 32", r"--seq-length \(64\) exceeds --max-position-embeddings"),
    ],
)
def test_section_checks_name_the_flag(extra, message):
    with pytest.raises(ConfigError, match=message):
        config(extra)


def test_unknown_flags_and_config_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(TINY + ["--not-a-flag"], world_size=1)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --not-a-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--tensor-model-parallel-size", "3"], world_size=3)
    assert "--num-attention-heads (8) must be divisible" in capsys.readouterr().err


def test_megatron_lm_rope_scaling_spelling():
    assert config("--use-rope-scaling").model.rope_scaling_type == "llama3"
