"""--stage rm end to end: a reward model trained through `pretrain_dpo.py` on CPU, proven against ground truths.

One set of assets per module (tiny tokenizer, learnable pairs with a margin column, a tiny HF Llama whose config
has a pad token), a TP1 run and a TP2 x PP2 run shared by the tests:
- the learnable set is learnt (accuracy >= 0.9 on train and validation), losses agree across layouts (1e-5);
- a resume from the middle continues bit-exactly;
- the engine's rewards (the value head at each sequence's last token) equal the logits of the exported
  transformers `LlamaForSequenceClassification` (1e-4) at TP1 and TP2 x PP2, and a classifier converted back
  (hf -> mg) gives them again.
The loss formula itself is checked by hand in tests/unit/dpo/test_rm.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_cli, run_ranks
from tests.e2e.dpo_assets import build_tiny_llama, learnable_pairs
from tests.e2e.test_dpo import SEQ, Assets, read_metrics

TRAIN = ("--stage rm --split 80,20,0 --lr 1e-3 --lr-decay-style constant --clip-grad 1.0 --log-interval 1 "
         "--global-batch-size 8 --micro-batch-size 2 --train-iters 6 --eval-interval 3 --eval-iters 1 "
         "--save-interval 3 --center-rewards-coefficient 0.01").split()
PAD = "<|end_of_text|>"  # never ends a llama3-template answer (<|eot_id|> does): the classifier's pad token


class RMAssets(Assets):
    """Test_dpo's assets with a margin column in the data (0, 0.5 or 1 per pair) and a pad id in the HF config."""

    def __init__(self, root: Path):
        from engine.data.preprocess import PreprocessConfig, preprocess
        from engine.tokenizer import TokenizerConfig, build_tokenizer
        from tests.assets import build_family_tokenizer_dir

        self.root = root
        self.tokenizer_dir = build_family_tokenizer_dir(root / "tokenizer", "llama3")
        tokenizer = build_tokenizer(TokenizerConfig("PretrainedFromHF", self.tokenizer_dir))
        self.vocab_size, self.pad_id = tokenizer.vocab_size, tokenizer.token_to_id(PAD)
        jsonl = root / "pairs.jsonl"
        records = [{**r, "gap": 0.5 * (i % 3)} for i, r in enumerate(learnable_pairs(48))]
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.data_prefix = str(root / "data" / "pairs")
        preprocess(PreprocessConfig(input=str(jsonl), output_prefix=self.data_prefix, map_keys={"margin": "gap"},
                                    tokenizer=TokenizerConfig("PretrainedFromHF", self.tokenizer_dir),
                                    prompt_type="llama3", log_interval=10**6))
        self.hf_policy = build_tiny_llama(root / "hf_policy", self.vocab_size, seed=0, num_layers=2)
        config = json.loads((self.hf_policy / "config.json").read_text())
        (self.hf_policy / "config.json").write_text(json.dumps({**config, "pad_token_id": self.pad_id}))
        self._converted = {}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> RMAssets:
    return RMAssets(tmp_path_factory.mktemp("rm"))


def run_rm(assets: RMAssets, save: Path, tp: int = 1, pp: int = 1, nproc: int = 1, extra: str = "",
           load: Path | None = None) -> tuple[list[dict], str]:
    checkpoint, flags = assets.checkpoint(tp, pp)
    args = [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), "--load", str(load or checkpoint), "--save", str(save),
            *extra.split()]
    result = run_cli("pretrain_dpo", args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_metrics(save), result.stdout + result.stderr


@pytest.fixture(scope="module")
def tp1(assets, tmp_path_factory):
    save = tmp_path_factory.mktemp("tp1")
    rows, log = run_rm(assets, save)
    return save, rows, log


@pytest.fixture(scope="module")
def tp2pp2(assets, tmp_path_factory):
    save = tmp_path_factory.mktemp("tp2pp2")
    rows, _ = run_rm(assets, save, 2, 2, 4, "--sequence-parallel --pack-sequences")
    return save, rows


def test_reward_model_learns_the_preference(tp1):
    save, rows, log = tp1
    assert "objective rm: loss = -logsigmoid(r_chosen - r_rejected - margin) + 0.01*(r_chosen + r_rejected)^2" in log
    assert "| reference none |" in log and "value head initialised: N(0, 0.02) from --seed 1234" in log
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert rows[-1]["rewards/accuracies"] >= 0.9 and rows[-1]["rewards/margins"] > 1.0
    valid = read_metrics(save, "valid")
    assert [r["iteration"] for r in valid] == [3, 6]
    assert valid[-1]["rewards/accuracies"] >= 0.9
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(valid[-1])
    saved = torch.load(save / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert saved["model"]["value_head.weight"].shape == (1, 64) and "output_layer.weight" not in saved["model"]
    assert saved["args"]["value_head_init"] == {"seed": 1234, "std": 0.02}


LAYOUTS = [Layout("dp2_distributed_optimizer", 2, "--use-distributed-optimizer")]


@layout_cases(LAYOUTS)
def test_losses_agree_across_layouts(layout, assets, tp1, tmp_path):
    rows, _ = run_rm(assets, tmp_path, layout.tp, layout.pp, layout.ranks, layout.flags)
    for metric in ("loss", "rewards/margins", "rewards/chosen"):
        assert [r[metric] for r in rows] == pytest.approx([r[metric] for r in tp1[1]], abs=1e-5), metric


def test_tp2pp2_sequence_parallel_packed_trains_like_tp1(tp1, tp2pp2):
    for metric in ("loss", "rewards/margins", "rewards/chosen", "rewards/accuracies"):
        assert [r[metric] for r in tp2pp2[1]] == pytest.approx([r[metric] for r in tp1[1]], abs=1e-5), metric


def test_resume_from_the_middle_is_bit_exact(assets, tp1, tmp_path):
    save, straight, _ = tp1
    resumed = tmp_path / "resumed"
    shutil.copytree(save, resumed, ignore=shutil.ignore_patterns("iter_0000006"))
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    rows, log = run_rm(assets, resumed, load=resumed)
    assert "iteration 3 (resumed)" in log
    timing = ("step_time_s", "tokens_per_s", "tflops_per_device", "peak_memory_gib")
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert untimed(rows) == untimed(straight)  # every metric of every step, to the bit
    a = torch.load(resumed / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    b = torch.load(save / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in b if not k.endswith("_extra_state"))


# -- the exported classifier --------------------------------------------------------------------------------


def engine_rewards(flags: list[str], root: str, samples: list[dict]) -> torch.Tensor | None:
    """Rank function: the rewards [2n] of `samples` (padded rows) from a checkpoint, loaded as training loads
    it, through megatron's forward-only schedule; on the last stage's TP rank 0, None elsewhere."""
    from megatron.core import parallel_state

    from engine.arguments import parse_args
    from engine.checkpoint.layout import read_tracker
    from engine.data.collate import collate_pairs
    from engine.dpo.stages import build_objective
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_frozen_model
    from engine.training.checkpointing import load_model_weights
    from engine.training.step import forward_only

    config = parse_args(flags, world_size=int(os.environ["WORLD_SIZE"]))
    platform = initialize_distributed(config.parallel)
    set_random_seeds(1)
    chunks = build_frozen_model(config, platform)
    load_model_weights(chunks, root, read_tracker(root), config)
    objective = build_objective(config.preference, config.model.vocab_size)
    batch = collate_pairs(samples)

    def forward_step(data_iterator, model):
        item, _ = next(data_iterator)
        return objective._forward(model, item), lambda values, non_loss_data=True: torch.cat(
            objective.rewards(values, item))

    collected = forward_only(forward_step, [(batch, None)], chunks, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        return collected[0]
    return None


def classifier_logits(hf_dir: Path, samples: list[dict], pad_id: int) -> torch.Tensor:
    """transformers' scores of the same 2n sequences, right-padded with the config's pad token."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == pad_id
    sequences = [torch.as_tensor(s[f"{side}_input_ids"]) for side in ("chosen", "rejected") for s in samples]
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_id)
    mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in sequences]).unsqueeze(1)).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def _export(checkpoint: Path, target: Path) -> Path:
    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    run_conversion(ConvertConfig(load_model_type="mg", save_model_type="hf", load_dir=str(checkpoint),
                                 save_dir=str(target)))
    return target


def _rank0(results: list) -> torch.Tensor:
    return next(r for r in results if r is not None)


@pytest.fixture(scope="module")
def exported(tp1, tp2pp2, tmp_path_factory) -> dict[tuple[int, int], Path]:
    """The TP1 and TP2 x PP2 runs' last checkpoints as transformers classifiers (mg -> hf)."""
    root = tmp_path_factory.mktemp("exported")
    return {(1, 1): _export(tp1[0], root / "tp1"), (2, 2): _export(tp2pp2[0], root / "tp2pp2")}


def test_engine_rewards_equal_the_exported_classifier_at_tp1_and_tp2pp2(assets, tp1, tp2pp2, exported, tmp_path):
    from engine.data.dataset import PairwiseDataset

    samples = [PairwiseDataset(assets.data_prefix, 128)[i] for i in (0, 7, 40, 45)]
    _, flags = assets.checkpoint(1, 1)
    model_flags = [*flags, *SEQ, "--stage", "rm"]
    for save, tp, pp in ((tp1[0], 1, 1), (tp2pp2[0], 2, 2)):
        hf = exported[(tp, pp)]
        config = json.loads((hf / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == assets.pad_id
        layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        engine = _rank0(run_ranks(engine_rewards, tp * pp, [*model_flags, *layout], str(save), samples))
        expected = classifier_logits(hf, samples, assets.pad_id)
        assert engine.shape == (8,) and engine.abs().max() > 0.5  # trained rewards, not the near-zero init
        torch.testing.assert_close(engine, expected, atol=1e-4, rtol=0)
    # The classifier converted back (hf -> mg, TP2) is a reward model to start from: same rewards.
    from tests.e2e.dpo_assets import convert

    back = tmp_path / "mg_from_classifier"
    convert(exported[(2, 2)], back, tp=2)
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1"]
    engine = _rank0(run_ranks(engine_rewards, 2, [*model_flags, *layout], str(back), samples))
    torch.testing.assert_close(engine, classifier_logits(exported[(2, 2)], samples, assets.pad_id), atol=1e-4, rtol=0)


def test_score_tool_scores_pairs_and_answers_from_a_megatron_checkpoint(assets, tp2pp2, exported, tmp_path, capsys):
    """tools/score.py on the TP2 x PP2 checkpoint gives the exported classifier's logits of the training sequences,
    and the validation pairs' accuracy."""
    import importlib.util

    from engine.data.dataset import PairwiseDataset

    spec = importlib.util.spec_from_file_location("score", Path(__file__).parents[2] / "tools" / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    held_out = list(range(40, 48))  # --split 80,20,0: the validation pairs
    records = [learnable_pairs(48)[i] for i in held_out]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"prompt": r["instruction"], "response": r["chosen"]})
                                                    + "\n" for r in records))
    common = ["--load", str(tp2pp2[0]), "--prompt-type", "llama3", "--tokenizer-name-or-path", assets.tokenizer_dir,
              "--batch-size", "3"]
    assert score.main([*common, "--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "p.jsonl")]) == 0
    expected = classifier_logits(exported[(2, 2)], [PairwiseDataset(assets.data_prefix, 128)[i] for i in held_out],
                                 assets.pad_id)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    got = torch.tensor([[r["chosen_score"] for r in rows], [r["rejected_score"] for r in rows]]).flatten()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    accuracy = (expected[:8] > expected[8:]).float().mean().item()
    assert accuracy >= 0.9 and f"8 pairs: accuracy {accuracy:.4f}" in capsys.readouterr().out
    assert score.main([*common, "--input", str(tmp_path / "answers.jsonl"), "--output", str(tmp_path / "a.jsonl")]) == 0
    answers = [json.loads(line)["score"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(answers), expected[:8], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "qwen2", "qwen3"])
def test_every_dense_family_round_trips_as_a_sequence_classifier(family, tmp_path):
    """An HF `*ForSequenceClassification` (num_labels 1) of each family -> megatron at TP2 x PP2 (its score as the
    value head, the tied embedding's output copy left out) -> the same classifier, tensor for tensor."""
    import transformers
    from safetensors.torch import load_file

    from tests.e2e.convert_assets import FAMILY_CONFIGS, TINY
    from tests.e2e.dpo_assets import convert

    config_class, overrides = FAMILY_CONFIGS[family]
    config = getattr(transformers, config_class)(**{**TINY, **overrides, "num_labels": 1, "pad_token_id": 3})
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mg", tp=2, pp=2)
    last = torch.load(tmp_path / "mg" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert last["model"]["value_head.weight"].shape == (1, 64) and "output_layer.weight" not in last["model"]
    _export(tmp_path / "mg", tmp_path / "back")
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert saved["architectures"] == [type(model).__name__] and saved["pad_token_id"] == 3
    original = load_file(tmp_path / "hf" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(original) - {"lm_head.weight"}
    assert all(torch.equal(back[k], original[k]) for k in back)


def test_lora_reward_model_trains_its_head_and_exports_merged_and_as_peft(assets, tmp_path):
    """LoRA at TP2 + sequence parallel: the frozen base's adapters and the new value head train (and nothing else is
    saved under --lora-ckpt-filter); the merged export and the PEFT adapter (the head in modules_to_save) on the
    base HF model score the validation pairs as the engine did."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion
    from engine.data.dataset import PairwiseDataset

    save = tmp_path / "lora"
    lora = dict(lora_load=str(save), lora_r=4, lora_alpha=8.0)
    rows, _ = run_rm(assets, save, tp=2, nproc=2, extra="--sequence-parallel --lora-r 4 --lora-alpha 8 "
                                                        "--lora-ckpt-filter --lr 5e-3")
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] >= 0.9
    saved = torch.load(save / "iter_0000006" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)["model"]
    assert "value_head.weight" in saved and all(".lora_" in k for k in saved if k != "value_head.weight")
    init = torch.empty(1, 64).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1234))
    assert (saved["value_head.weight"] - init).abs().max() > 1e-3  # the head trained beside the adapters

    base, _ = assets.checkpoint(2, 1)
    merged, peft_dir = tmp_path / "merged", tmp_path / "peft"
    run_conversion(ConvertConfig("mg", "hf", str(base), str(merged), **lora))
    run_conversion(ConvertConfig("mg", "hf", str(base), str(peft_dir), save_lora_to_hf=True, **lora))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    valid = [PairwiseDataset(assets.data_prefix, 128)[i] for i in range(38, 46)]  # the evaluated batch
    expected = classifier_logits(merged, valid, assets.pad_id)
    engine = read_metrics(save, "valid")[-1]
    assert engine["rewards/chosen"] == pytest.approx(expected[:8].mean().item(), abs=1e-4)
    assert engine["rewards/rejected"] == pytest.approx(expected[8:].mean().item(), abs=1e-4)
    model = AutoModelForSequenceClassification.from_pretrained(assets.hf_policy, num_labels=1, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, peft_dir).eval()
    sequences = [torch.as_tensor(s[f"{side}_input_ids"]) for side in ("chosen", "rejected") for s in valid]
    with torch.no_grad():
        scores = torch.stack([model(input_ids=s.unsqueeze(0)).logits[0, 0] for s in sequences])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
