"""Flag parsing and cross-section validation: impossible layouts fail before any work."""

from __future__ import annotations

import re

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
        ("--pipeline-model-parallel-size 3 --num-layer-list 1,1,1", 3, r"--num-layer-list 1,1,1 sums to 3, not --num-layers \(4\)"),
        ("--max-tokens-per-micro-batch 63", 1, r"--max-tokens-per-micro-batch \(63\) must hold the longest pair: at "
                                               r"least 2 x --seq-length \(64\)"),
        ("--max-tokens-per-micro-batch 64 --dpo-loss-type aot", 1, r"--dpo-loss-type aot sorts over the pairs of a "
                                                                   r"micro-batch, which a token budget would change"),
        ("--stage kto --micro-batch-size 2 --shared-prompt", 1, r"--shared-prompt cannot be combined with --stage kto"),
        ("--stage rm --max-tokens-per-micro-batch 128", 1,
         r"--max-tokens-per-micro-batch cannot be combined with --stage rm"),
        ("--shared-prompt --num-experts 4 --moe-ffn-hidden-size 48 --swiglu --disable-bias-linear", 1,
         r"--shared-prompt cannot be combined with --num-experts"),
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
        ("--lr-warmup-fraction 1.0", r"--lr-warmup-fraction must be in \[0, 1\)"),
        ("--train-iters 10 --lr-warmup-iters 10", r"--lr-warmup-iters \(10\) must be below the decay steps \(10, "
                                                  r"--train-iters\)"),
        ("--train-iters 10 --lr-decay-iters 4 --lr-warmup-iters 5", r"below the decay steps \(4, --lr-decay-iters"),
        ("--lr 1e-5 --lr-warmup-init 1e-4", r"--lr-warmup-init \(0.0001\) exceeds --lr"),
        ("--save-interval 10", r"--save-interval needs --save"),
        ("--seq-length 64 --max-position-embeddings 32", r"--seq-length \(64\) exceeds --max-position-embeddings"),
        ("--pipeline-model-parallel-size 2 --num-layer-list 1,2,1", r"--num-layer-list 1,2,1 needs one positive count per"),
        ("--pipeline-model-parallel-size 2 --num-layer-list 4,0", r"needs one positive count per pipeline stage"),
        ("--pipeline-model-parallel-size 2 --num-layer-list 1,3 --num-layers-per-virtual-pipeline-stage 1",
         r"--num-layer-list cannot be combined with --num-layers-per-virtual-pipeline-stage"),
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


def test_uneven_pipeline_split_is_accepted_and_parsed():
    parsed = config("--pipeline-model-parallel-size 3 --num-layer-list 1,2,1")
    validate(parsed, world_size=3)
    assert parsed.parallel.num_layer_list == (1, 2, 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--num-layer-list", "1;3"])


def test_megatron_lm_rope_scaling_spelling():
    assert config("--use-rope-scaling").model.rope_scaling_type == "llama3"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--stage rrhf", r"invalid choice: 'rrhf'"),
        ("--kto-desirable-weight 2", r"--kto-desirable-weight does not apply to --stage dpo"),
        ("--stage kto --kto-undesirable-weight 0", r"--kto-undesirable-weight must be > 0"),
        ("--stage kto --reference-free", r"--reference-free does not apply to --stage kto: its KL reference point"),
        ("--stage kto --micro-batch-size 1", r"--stage kto pairs each prompt with another completion .* "
                                             r"--micro-batch-size >= 2"),
        ("--discopop-tau 0.1", r"--discopop-tau needs --dpo-loss-type discopop"),
        ("--simpo-gamma 0.5", r"--simpo-gamma applies to --stage simpo and to --stage cpo --dpo-loss-type simpo, "
                              r"not to --stage dpo"),
        ("--stage cpo --simpo-gamma 0.5", r"not to --stage cpo --dpo-loss-type sigmoid"),
        ("--stage simpo --ref-model ref", r"--ref-model does not apply: --stage simpo builds no reference model"),
        ("--reference-free --refer-model-iter 2", r"--refer-model-iter does not apply: --reference-free"),
        ("--dpo-loss-type sigmoid sft --dpo-loss-weights 1", r"--dpo-loss-weights has 1 values for 2 --dpo-loss-type"),
        ("--stage cpo --dpo-loss-weights 0.5", r"--dpo-loss-weights does not apply to --stage cpo"),
        ("--stage orpo --dpo-beta 0.2", r"--dpo-beta does not apply to --stage orpo"),
        ("--stage simpo --dpo-loss-type sigmoid", r"--dpo-loss-type does not apply to --stage simpo"),
        ("--stage cpo --dpo-loss-type robust", r"--dpo-loss-type robust does not apply to --stage cpo"),
        ("--stage cpo --dpo-loss-type sigmoid hinge", r"--stage cpo takes one --dpo-loss-type"),
        ("--dpo-loss-type simpo", r"--dpo-loss-type simpo does not apply to --stage dpo"),
        ("--dpo-loss-type hinge --dpo-label-smoothing 0.1", r"--dpo-label-smoothing applies to the losses sigmoid, "
                                                            r"robust, .*; not to --stage dpo --dpo-loss-type hinge"),
        ("--stage orpo --dpo-label-smoothing 0.1", r"not to --stage orpo"),
        ("--simpo-beta 2", r"--simpo-beta does not apply to --stage dpo"),
        ("--orpo-beta 0.2", r"--orpo-beta does not apply to --stage dpo"),
        ("--stage cpo --no-orpo-prompt-loss", r"--orpo-prompt-loss does not apply to --stage cpo"),
        ("--cpo-alpha 1", r"--cpo-alpha does not apply to --stage dpo"),
        ("--stage cpo --rpo-alpha 1", r"--rpo-alpha does not apply to --stage cpo"),
        ("--stage orpo --pref-ftx 0.1", r"--pref-ftx does not apply to --stage orpo"),
        ("--stage simpo --reference-free", r"--reference-free: --stage simpo is reference-free already"),
        ("--stage simpo --ld-alpha 0.5", r"--ld-alpha does not apply to --stage simpo"),
        ("--dpo-loss-type ipo --ld-alpha 0.5", r"--dpo-loss-type ipo already normalizes by length"),
        ("--ld-alpha 1.5", r"--ld-alpha must be in \[0, 1\]"),
        ("--rpo-alpha 1 --pref-ftx 1", r"--rpo-alpha and --pref-ftx both weight the chosen NLL"),
        ("--dpo-loss-type sigmoid sigmoid", r"names a loss twice"),
    ],
)
def test_preference_flags_that_do_not_apply_are_rejected(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(TINY + extra.split(), world_size=1)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_aot_needs_pairs_to_sort():
    with pytest.raises(ConfigError, match=r"--dpo-loss-type aot sorts .* use --micro-batch-size >= 2"):
        validate(config("--dpo-loss-type aot"), world_size=1)
    validate(config("--dpo-loss-type aot_unpaired --micro-batch-size 2"), world_size=1)


@pytest.mark.parametrize(
    "extra, described, reference",
    [
        ("", "dpo: loss = sigmoid | --dpo-beta 0.1, --dpo-label-smoothing 0, reference model", True),
        ("--dpo-loss-type sigmoid sft --dpo-loss-weights 0.7 0.3 --ld-alpha 0.5",
         "dpo: loss = 0.7*sigmoid + 0.3*sft | --dpo-beta 0.1, --dpo-label-smoothing 0, --ld-alpha 0.5", True),
        ("--dpo-loss-type discopop --reference-free --rpo-alpha 0.2",
         "dpo: loss = discopop + 0.2*nll | --dpo-beta 0.1, --discopop-tau 0.05, reference-free", False),
        ("--stage simpo", "simpo: loss = simpo | --simpo-beta 2, --dpo-label-smoothing 0, --simpo-gamma 1", False),
        ("--stage orpo --orpo-beta 0.25", "orpo: loss = orpo + 1*nll | --orpo-beta 0.25", False),
        ("--stage orpo --no-orpo-prompt-loss", "orpo: loss = orpo + 1*nll | --orpo-beta 0.1, token-averaged log-probs "
         "for orpo, reference-free, nll: mean over the global batch's chosen answer tokens (--no-orpo-prompt-loss)",
         False),
        ("--stage cpo --dpo-loss-type simpo --simpo-gamma 0.5",
         "cpo: loss = simpo + 1*nll | --dpo-beta 0.1, --dpo-label-smoothing 0, --simpo-gamma 0.5", False),
    ],
)
def test_preference_defaults_and_the_objective_description(extra, described, reference):
    pref = config(extra).preference
    assert pref.describe().startswith(described)
    assert pref.uses_reference is reference


def test_stage_defaults():
    simpo, orpo, cpo = (config(f"--stage {s}").preference for s in ("simpo", "orpo", "cpo"))
    assert (simpo.simpo_beta, simpo.simpo_gamma, simpo.cpo_alpha, simpo.beta, simpo.nll_weight) == (2.0, 1.0, 0.0, 2.0, 0.0)
    assert (orpo.orpo_beta, orpo.beta, orpo.nll_weight, orpo.loss_terms) == (0.1, 0.1, 1.0, [(1.0, "orpo")])
    assert orpo.orpo_prompt_loss is True and cpo.orpo_prompt_loss is None
    assert (cpo.dpo_beta, cpo.cpo_alpha, cpo.loss_terms, cpo.simpo_gamma) == (0.1, 1.0, [(1.0, "sigmoid")], None)
    dpo = config("--dpo-loss-type robust apo_zero --dpo-loss-weights 0.5 2 --dpo-label-smoothing 0.1").preference
    assert dpo.loss_terms == [(0.5, "robust"), (2.0, "apo_zero")] and dpo.nll_weight == 0.0


def test_the_help_states_the_defaults_each_stage_and_loss_gets():
    """The help of an option only some stages or losses read names each of them with the value a run gets there."""
    from engine.loss_catalog import STAGE_TRAITS

    actions = build_parser()._option_string_actions
    cases = [(stage, traits.options) for stage, traits in STAGE_TRAITS.items()] + [
        ("simpo", ("simpo_gamma",)), ("cpo --dpo-loss-type simpo", ("simpo_gamma",)),
        ("dpo --dpo-loss-type discopop", ("discopop_tau",))]
    checked = set()
    for where, names in cases:
        preference = config(f"--stage {where}").preference
        for name in names:
            value = getattr(preference, name)
            if value is None:
                continue
            shown = "on" if value is True else " ".join(value) if isinstance(value, list) else str(value)
            text = " ".join(actions["--" + name.replace("_", "-")].help.split())
            listed = re.search(rf"--stage ([^;)]*, )?{re.escape(where)}(, [^;)]*)?; default {re.escape(shown)}\)", text)
            assert listed or re.search(rf"{re.escape(where)}[ ,]+\(?default {re.escape(shown)}\)", text), (name, text)
            checked.add(name)
    assert checked == {"dpo_loss_type", "dpo_beta", "simpo_beta", "cpo_alpha", "orpo_beta", "orpo_prompt_loss",
                       "kto_desirable_weight", "kto_undesirable_weight", "center_rewards_coefficient", "simpo_gamma",
                       "discopop_tau"}


# -- one declaration per flag ------------------------------------------------------------------------------


def test_every_config_field_is_one_flag_with_help_and_its_default():
    from engine.arguments import SECTIONS
    from engine.options import declared_fields, flag_name

    parser = build_parser()
    actions = parser._option_string_actions
    for section, _ in SECTIONS.values():
        for f in declared_fields(section):
            action = actions[flag_name(f.name)]
            assert action.dest == f.name and action.help, f.name
    # Defaults come from the dataclass alone: a flag not given leaves the field's default.
    cfg = config()
    assert (cfg.training.lr, cfg.model.rotary_base, cfg.lora.lora_target_modules) == (
        1e-5, 10000, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    assert "(default: 1e-05)" in actions["--lr"].help
    assert config("--use-rope-scaling").model.rope_scaling_type == "llama3"


def test_flag_layer_loads_without_torch():
    import subprocess
    import sys

    code = "import sys, engine.arguments, engine.loss_catalog; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_catalogued_loss_has_a_formula():
    from engine.dpo.losses import _FORMULAS
    from engine.loss_catalog import LOSS_TRAITS

    assert set(_FORMULAS) == set(LOSS_TRAITS)


# -- --validate-only fails where a real start would ---------------------------------------------------------


def _shards(prefix):
    from engine.formats import OUTPUT_KEYS, output_path_prefix

    prefix.parent.mkdir(parents=True, exist_ok=True)
    for key in OUTPUT_KEYS:
        for ext in (".bin", ".idx"):
            (prefix.parent / (prefix.name + output_path_prefix("", key) + ext)).touch()
    return str(prefix)


@pytest.mark.parametrize("break_it, message", [
    (lambda a: a.remove_flag("--data-path"), r"needs --data-path"),
    (lambda a: a.remove_flag("--load"), r"needs --load"),
    (lambda a: a.remove_flag("--train-iters"), r"needs --train-iters"),
    (lambda a: a.set("--load", "nowhere"), r"--load nowhere: no such directory"),
    (lambda a: a.set("--data-path", "data/other"), r"--data-path 'data/other': no preprocessed pairwise files"),
    (lambda a: a.set("--split", "98,x"), r"--split '98,x' must be up to three comma-separated numbers"),
])
def test_training_start_needs_its_inputs(tmp_path, monkeypatch, capsys, break_it, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    _shards(tmp_path / "data" / "pairs")
    flags = _Flags(TINY + "--data-path data/pairs --load ckpt --train-iters 3 --split 98,2,0".split())
    parse_args(flags.argv, world_size=1, for_training=True)  # the intact flags pass
    break_it(flags)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags.argv, world_size=1, for_training=True)
    assert exit_info.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


class _Flags:
    def __init__(self, argv):
        self.argv = list(argv)

    def remove_flag(self, flag):
        i = self.argv.index(flag)
        del self.argv[i:i + 2]

    def set(self, flag, value):
        self.argv[self.argv.index(flag) + 1] = value


def test_every_stage_has_traits_and_an_objective():
    from engine.dpo.stages import OBJECTIVES
    from engine.loss_catalog import STAGE_TRAITS, STAGES

    assert set(OBJECTIVES) == set(STAGE_TRAITS) == set(STAGES)
    for name, traits in STAGE_TRAITS.items():
        assert traits.beta in traits.options or name == "dpo" or (traits.beta is None and traits.value_head), name
        assert set(traits.defaults) <= set(traits.options), name


MOE = " --num-experts 4 --moe-ffn-hidden-size 48 --swiglu --disable-bias-linear"


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (MOE + " --expert-model-parallel-size 3", 3, r"--num-experts \(4\) must be divisible by "
                                                      r"--expert-model-parallel-size \(3\)"),
        (MOE + " --expert-model-parallel-size 4 --pipeline-model-parallel-size 2", 4,
         r"world size 4 is not divisible by --expert-tensor-parallel-size \(1\) x --expert-model-parallel-size \(4\) "
         r"x --pipeline-model-parallel-size \(2\)"),
        (MOE + " --expert-model-parallel-size 2 --tensor-model-parallel-size 2", 4,
         r"--num-experts with --tensor-model-parallel-size 2 needs --sequence-parallel"),
        (MOE + " --expert-tensor-parallel-size 2 --expert-model-parallel-size 2", 4,
         r"--expert-tensor-parallel-size \(2\) must divide --tensor-model-parallel-size \(1\): checkpoint files are "
         r"named by TP and EP rank only"),
        (MOE + " --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 "
               "--expert-model-parallel-size 4", 6,
         r"world size 6 is not divisible by --expert-tensor-parallel-size \(1\) x --expert-model-parallel-size \(4\)"),
        (MOE + " --tensor-model-parallel-size 2 --expert-tensor-parallel-size 1 --expert-model-parallel-size 2", 4,
         r"--num-experts with --tensor-model-parallel-size 2 needs --sequence-parallel"),
        (MOE + " --moe-ffn-hidden-size 50 --tensor-model-parallel-size 4 --sequence-parallel", 4,
         r"--moe-ffn-hidden-size \(50\) must be divisible by --expert-tensor-parallel-size \(4\)"),
        (MOE + " --moe-token-dispatcher-type allgather --pack-sequences", 1,
         r"--pack-sequences needs --moe-token-dispatcher-type alltoall"),
        (" --expert-model-parallel-size 2", 2, r"--expert-model-parallel-size and --expert-tensor-parallel-size need "
                                                r"--num-experts"),
    ],
)
def test_moe_layouts_name_the_flags(extra, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(extra), world_size=world)


@pytest.mark.parametrize("extra, world", [
    (" --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1", 2),
    (" --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 "
     "--expert-model-parallel-size 2", 4),
    (" --tensor-model-parallel-size 4 --sequence-parallel --expert-tensor-parallel-size 2 "
     "--expert-model-parallel-size 4", 8),
])
def test_expert_tensor_parallel_below_tp_is_accepted(extra, world):
    validate(config(MOE + extra), world_size=world)


@pytest.mark.parametrize(
    "extra, message",
    [
        (" --moe-router-topk 3 --moe-aux-loss-coeff 0.1",
         r"--moe-aux-loss-coeff, --moe-router-topk need\(s\) --num-experts"),
        (MOE + " --moe-router-topk 5", r"--moe-router-topk \(5\) must be between 1 and --num-experts \(4\)"),
        (MOE + " --moe-router-topk 1", r"--moe-router-topk 1 needs --moe-router-pre-softmax"),
        (MOE + " --moe-shared-expert-gate", r"--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"),
        (MOE + " --moe-shared-expert-intermediate-size 32 --moe-shared-expert-overlap --moe-token-dispatcher-type "
               "allgather", r"--moe-shared-expert-overlap needs --moe-token-dispatcher-type alltoall"),
        (MOE + " --moe-router-load-balancing-type none --moe-aux-loss-coeff 0.01",
         r"--moe-aux-loss-coeff needs a --moe-router-load-balancing-type other than none"),
    ],
)
def test_moe_section_checks_name_the_flag(extra, message):
    with pytest.raises(ConfigError, match=message):
        config(extra)


def test_moe_layout_that_fits():
    cfg = config(MOE + " --expert-model-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel")
    validate(cfg, world_size=4)
    assert (cfg.parallel.expert_model_parallel_size, cfg.parallel.expert_tensor_size) == (2, 2)
    assert cfg.moe.expert_ffn(cfg.model) == 48 and cfg.moe.moe_token_dispatcher_type == "alltoall"


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("1", [1, 1, 1, 1]),
        ("2", [1, 0, 1, 0]),  # Megatron-LM: layers 0, N, 2N, ... are MoE
        ("[0]*1+[1]*3", [0, 1, 1, 1]),
        ("([1]*1+[0]*1)*2", [1, 0, 1, 0]),
        ("[0,1] * (1+1)", [0, 1, 0, 1]),
    ],
)
def test_moe_layer_freq_reads_megatrons_integer_and_list_patterns(text, pattern):
    from engine.arguments import moe_layer_freq_text

    cfg = config(MOE + " --moe-layer-freq " + text.replace(" ", ""))
    validate(cfg, world_size=1)
    assert cfg.moe.layer_pattern(cfg.model.num_layers) == pattern
    assert config(MOE + " --moe-layer-freq " + moe_layer_freq_text(pattern)).moe.layer_pattern(4) == pattern


@pytest.mark.parametrize(
    "text, message",
    [
        ("__import__('os').system('true')", "expected an integer N or a list pattern"),
        ("[__import__('os')]", "Call is not allowed"),
        ("[1]*10**9", "Pow is not allowed"),
        ("[1]*1000000", "up to 100000 entries"),
        ("[1]+1", r"'\+' joins two lists"),
        ("[1.5]*4", "Constant is not allowed"),
        ("2*2", "expected an integer N"),
    ],
)
def test_moe_layer_freq_runs_no_code_and_says_what_it_reads(text, message, capsys):
    with pytest.raises(SystemExit):
        config(MOE + " --moe-layer-freq " + text)
    assert "--moe-layer-freq" in capsys.readouterr().err
    from engine.arguments import parse_moe_layer_freq

    with pytest.raises(Exception, match=message):
        parse_moe_layer_freq(text)


@pytest.mark.parametrize(
    "extra, message",
    [
        (MOE + " --moe-layer-freq [0,1,1]", r"--moe-layer-freq has 3 entries, --num-layers 4"),
        (MOE + " --moe-layer-freq [0,2,1,1]", r"--moe-layer-freq \[0, 2, 1, 1\]: an integer >= 1, or a list of 0"),
        (MOE + " --moe-layer-freq 0", r"--moe-layer-freq 0: an integer >= 1"),
        (MOE + " --moe-layer-freq [0]*4", r"--moe-layer-freq makes no layer an MoE layer"),
        (" --moe-layer-freq 2", r"--moe-layer-freq need\(s\) --num-experts"),
    ],
)
def test_moe_layer_freq_checks_name_the_flag(extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(extra), world_size=1)


def test_a_tool_declares_another_programs_flags_from_the_same_fields():
    """tools/score.py reads records as preprocess_data.py does: the same declarations, defaults and help."""
    import argparse

    from engine.data.preprocess import PreprocessConfig
    from engine.options import add_options, values_from_args

    parser = argparse.ArgumentParser()
    add_options(parser, PreprocessConfig, "records", only=["prompt_type", "map_keys"])
    assert {a.dest for a in parser._actions} == {"help", "prompt_type", "map_keys"}
    args = parser.parse_args(["--map-keys", '{"prompt": "question"}'])
    assert values_from_args(args, PreprocessConfig, ["prompt_type", "map_keys"]) == {
        "prompt_type": "empty", "map_keys": {"prompt": "question"}}
