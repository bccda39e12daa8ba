"""DPO on a mixture-of-experts model through pretrain_dpo.py: a tiny Qwen2-MoE converted from transformers
(4 experts, top-2 of a softmax over all experts, a shared expert with its sigmoid gate).

One run on one rank is the ground truth; expert-parallel layouts (both token dispatchers, TP x EP with
sequence parallel, whole experts under TP (ETP1), PP x EP, the distributed optimizer, a cached reference) must
give step 1 = ln 2 and the same losses and router losses, which are on (load balancing and z-loss) and join the
policy's loss only. Under sequence parallelism the padding sits in the last TP rank's share: the z-loss is still
the mean over the micro-batch's real tokens (engine.model.router), so TP layouts agree too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_cli
from tests.e2e.convert_assets import build_tiny_moe
from tests.e2e.dpo_assets import build_preference_data, convert
from tests.e2e.test_dpo import _model_flags, read_metrics

DPO = "--stage dpo --dpo-beta 0.1"
TRAIN = ("--is-pairwise-dataset --split 100,0,0 --lr 1e-3 --lr-decay-style constant "
         "--clip-grad 1.0 --log-interval 1 --global-batch-size 8 --micro-batch-size 2 --seq-length 64 "
         "--moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001").split()
ROUTER = ("moe/load_balancing_loss", "moe/z_loss")


class MoeAssets:
    def __init__(self, root: Path):
        from engine.tokenizer import TokenizerConfig, build_tokenizer

        self.root = root
        self.tokenizer_dir, self.data_prefix = build_preference_data(root, pairs=24)
        vocab = build_tokenizer(TokenizerConfig("PretrainedFromHF", self.tokenizer_dir)).vocab_size
        self.hf = build_tiny_moe("qwen2_moe", root / "hf", seed=0, vocab_size=vocab, max_position_embeddings=128)
        self._converted: dict[tuple[int, ...], tuple[Path, list[str]]] = {}
        self._vocab = vocab
        self._layered: dict[int, tuple[Path, list[str]]] = {}
        self._unpaired: str | None = None

    def unpaired_prefix(self) -> str:
        """The same pairs as unpaired samples (preprocess_data.py --unpair), for --stage kto."""
        if self._unpaired is None:
            from engine.data.preprocess import PreprocessConfig, preprocess
            from engine.tokenizer import TokenizerConfig

            self._unpaired = str(self.root / "data" / "unpaired")
            preprocess(PreprocessConfig(input=str(self.root / "pairs.jsonl"), output_prefix=self._unpaired,
                                        unpair=True, tokenizer=TokenizerConfig("PretrainedFromHF", self.tokenizer_dir),
                                        prompt_type="llama3", log_interval=10**6))
        return self._unpaired

    def checkpoint(self, tp: int, pp: int, etp: int | None = None) -> tuple[Path, list[str]]:
        """Converted without expert parallelism: an EP run's ranks take their experts from these files. `etp`:
        each expert split over that many ranks (--target-expert-tensor-parallel-size), not over TP."""
        if etp not in (None, tp):
            key = (tp, pp, etp)
            if key not in self._converted:
                from engine.convert.common import ConvertConfig
                from engine.convert.run import run_conversion

                target = self.root / f"mg_tp{tp}pp{pp}etp{etp}"
                flags = run_conversion(ConvertConfig("hf", "mg", str(self.hf), str(target), tp, pp,
                                                     target_expert_tensor_parallel_size=etp,
                                                     make_vocab_size_divisible_by=16))
                self._converted[key] = target, _model_flags(flags)
            return self._converted[key]
        if (tp, pp) not in self._converted:
            target = self.root / f"mg_tp{tp}pp{pp}"
            self._converted[(tp, pp)] = target, _model_flags(convert(self.hf, target, tp, pp))
        return self._converted[(tp, pp)]

    def layered_checkpoint(self, pp: int) -> tuple[Path, list[str]]:
        """A 4-layer Qwen2-MoE whose even layers are dense MLPs (decoder_sparse_step 2: --moe-layer-freq [0,1]*2),
        converted at PP `pp`."""
        if not self._layered:
            self.hf_layered = build_tiny_moe("qwen2_moe", self.root / "hf_layered", seed=1, vocab_size=self._vocab,
                                             max_position_embeddings=128, num_hidden_layers=4, decoder_sparse_step=2)
        if pp not in self._layered:
            target = self.root / f"mg_layered_pp{pp}"
            self._layered[pp] = target, _model_flags(convert(self.hf_layered, target, 1, pp))
        return self._layered[pp]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> MoeAssets:
    return MoeAssets(tmp_path_factory.mktemp("moe_dpo"))


def run_moe_dpo(assets: MoeAssets, save: Path, layout: Layout, extra: str = "", load: Path | None = None,
                stage: str = DPO, converted: tuple[Path, list[str]] | None = None, data: str | None = None
                ) -> list[dict]:
    etp = layout.argv[layout.argv.index("--expert-tensor-parallel-size") + 1] if "--expert-tensor-parallel-size" in \
        layout.argv else None
    checkpoint, flags = converted or assets.checkpoint(layout.tp, layout.pp, etp and int(etp))
    args = [*flags, *TRAIN, *stage.split(), "--data-path", data or assets.data_prefix, "--tensor-model-parallel-size",
            str(layout.tp),
            "--pipeline-model-parallel-size", str(layout.pp), "--load", str(load or checkpoint), "--save", str(save),
            *layout.argv, *extra.split()]
    result = run_cli("pretrain_dpo", args, nproc=layout.ranks)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return read_metrics(save)


@pytest.fixture(scope="module")
def one_rank(assets, tmp_path_factory):
    rows = run_moe_dpo(assets, tmp_path_factory.mktemp("ep1"), Layout("ep1", 1), "--train-iters 3")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(0.5 < row["moe/load_balancing_loss"] < 4 and row["moe/z_loss"] > 0 for row in rows)
    return rows


# TP2 x EP2 with every expert whole on its rank (ETP1).
WHOLE_EXPERTS = Layout("tp2ep2etp1", 4, "--expert-model-parallel-size 2 --expert-tensor-parallel-size 1 "
                                        "--sequence-parallel", tp=2)

LAYOUTS = [
    Layout("ep2_distributed_optimizer", 2, "--expert-model-parallel-size 2 --use-distributed-optimizer"),
    Layout("ep2_allgather", 2, "--expert-model-parallel-size 2 --moe-token-dispatcher-type allgather"),
    Layout("pp2ep2", 4, "--expert-model-parallel-size 2", pp=2),
    Layout("ep2_cached_reference", 2, "--expert-model-parallel-size 2 --precompute-ref-logps"),
    # Packed rows (THD) against the padded one-rank run, router losses included: the routers leave padding out.
    Layout("packed", 1, "--pack-sequences"),
    Layout("packed_ep2", 2, "--expert-model-parallel-size 2 --pack-sequences"),
    # Sequence parallel: the padding in the last TP rank's share; the second stage of TP2 x PP2 cuts the padding
    # mask as megatron cuts its hidden states.
    Layout("tp2ep2", 4, "--expert-model-parallel-size 2 --sequence-parallel", tp=2),
    Layout("tp2pp2", 4, "--sequence-parallel", tp=2, pp=2),
    WHOLE_EXPERTS,
]


@layout_cases(LAYOUTS)
def test_moe_dpo_agrees_across_expert_parallel_layouts(layout, assets, one_rank, tmp_path):
    rows = run_moe_dpo(assets, tmp_path, layout, "--train-iters 3")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("loss", "rewards/margins", *ROUTER):
        assert [r[name] for r in rows] == pytest.approx([r[name] for r in one_rank], abs=1e-5), name


def test_moe_resume_from_an_expert_parallel_checkpoint(assets, one_rank, tmp_path):
    """Stopped after step 1 and resumed: step 3 also checks the optimizer states (distributed) carried over."""
    layout = Layout("ep2", 2, "--expert-model-parallel-size 2 --use-distributed-optimizer")
    run_moe_dpo(assets, tmp_path, layout, "--train-iters 1")
    saved = sorted(p.name for p in (tmp_path / "iter_0000001").iterdir() if p.is_dir())
    assert saved == ["mp_rank_00_000", "mp_rank_00_001"]  # Megatron-LM's names: TP rank, then EP rank
    rows = run_moe_dpo(assets, tmp_path, layout, "--train-iters 3", load=tmp_path)  # metrics.jsonl is appended
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for name in ("loss", *ROUTER):
        assert [r[name] for r in rows[1:]] == pytest.approx([r[name] for r in one_rank[1:3]], abs=1e-5), name


LORA = "--train-iters 2 --lora-r 4 --lora-alpha 8 --lr 1e-2"


@pytest.fixture(scope="module")
def lora_one_rank(assets, tmp_path_factory) -> tuple[list[dict], Path]:
    """LoRA on attention and every expert at one rank: (its metrics, its save directory)."""
    save = tmp_path_factory.mktemp("lora_ep1")
    rows = run_moe_dpo(assets, save, Layout("ep1", 1), LORA)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[1]["loss"] != rows[0]["loss"]
    return rows, save


def test_moe_lora_on_experts_agrees_at_ep2_and_merges(assets, lora_one_rank, tmp_path):
    """Adapters on attention and on every expert's linears (each expert its own): EP2 trains as one rank does,
    and the EP2 checkpoint's adapters merge into the HF experts they belong to."""
    from safetensors.torch import load_file

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    one, _ = lora_one_rank
    two = run_moe_dpo(assets, tmp_path / "ep2", Layout("ep2", 2, "--expert-model-parallel-size 2"), LORA)
    for name in ("loss", *ROUTER):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], abs=1e-5), name
    base, _ = assets.checkpoint(1, 1)
    merged = tmp_path / "hf_merged"
    run_conversion(ConvertConfig("mg", "hf", str(base), str(merged), lora_load=str(tmp_path / "ep2"), lora_r=4,
                                 lora_alpha=8.0))
    before, after = load_file(assets.hf / "model.safetensors"), load_file(merged / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Every expert's projections and the shared expert's moved; the router and the norms did not.
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(4)} <= changed
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in changed
    assert not any("norm" in k or k.endswith("mlp.gate.weight") for k in changed)
    # The same adapters as a PEFT adapter (experts through target_parameters, the shared expert's and attention's
    # linears through target_modules) on the base HF model give the merged checkpoint's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_dir = tmp_path / "peft"
    run_conversion(ConvertConfig("mg", "hf", str(base), str(peft_dir), lora_load=str(tmp_path / "ep2"), lora_r=4,
                                 lora_alpha=8.0, save_lora_to_hf=True))
    tokens = torch.arange(3, 35).unsqueeze(0)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        plain, expected = load(assets.hf)(tokens).logits, load(merged)(tokens).logits
        got = PeftModel.from_pretrained(load(assets.hf), peft_dir).eval()(tokens).logits
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_moe_reward_model_agrees_at_ep2(assets, tmp_path):
    """--stage rm on the MoE decoder: the value head's losses, rewards and router losses match one rank."""
    one = run_moe_dpo(assets, tmp_path / "ep1", Layout("ep1", 1), "--train-iters 3", stage="--stage rm")
    two = run_moe_dpo(assets, tmp_path / "ep2", Layout("ep2", 2, "--expert-model-parallel-size 2"),
                      "--train-iters 3", stage="--stage rm")
    assert one[-1]["loss"] < one[0]["loss"]
    for name in ("loss", "rewards/margins", *ROUTER):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], abs=1e-5), name


def test_moe_kto_agrees_at_ep2(assets, tmp_path):
    """--stage kto on the MoE decoder (the pairs as unpaired samples): losses, KL point, rewards and router losses
    at EP2 equal one rank's."""
    kto = "--stage kto --dpo-beta 0.1 --micro-batch-size 4"
    one = run_moe_dpo(assets, tmp_path / "ep1", Layout("ep1", 1), "--train-iters 2", stage=kto,
                      data=assets.unpaired_prefix())
    two = run_moe_dpo(assets, tmp_path / "ep2", Layout("ep2", 2, "--expert-model-parallel-size 2"), "--train-iters 2",
                      stage=kto, data=assets.unpaired_prefix())
    assert one[0]["loss"] == pytest.approx(0.5, abs=1e-6) and one[1]["loss"] != one[0]["loss"]
    for name in ("loss", "kl", "rewards/chosen", "rewards/rejected", *ROUTER):
        assert [r[name] for r in two] == pytest.approx([r[name] for r in one], abs=1e-5), name


def test_moe_dpo_with_dense_layers_agrees_under_the_interleaved_pipeline(assets, tmp_path):
    """--moe-layer-freq from a converted Qwen2-MoE (decoder_sparse_step 2: layers 0 and 2 dense, 1 and 3 MoE) trains;
    PP2 x VPP2 puts the dense layers 0 and 2 on the first stage and the MoE layers 1 and 3 on the second (the
    pattern indexes the whole model's layers), and gives one rank's losses and router losses."""
    one = run_moe_dpo(assets, tmp_path / "one", Layout("one", 1), "--train-iters 3",
                      converted=assets.layered_checkpoint(1))
    assert one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and one[-1]["loss"] != one[0]["loss"]
    vpp = run_moe_dpo(assets, tmp_path / "vpp", Layout("pp2vpp2", 2, "--num-layers-per-virtual-pipeline-stage 1",
                                                       pp=2), "--train-iters 3", converted=assets.layered_checkpoint(2))
    for name in ("loss", "rewards/margins", *ROUTER):
        assert [r[name] for r in vpp] == pytest.approx([r[name] for r in one], abs=1e-5), name


def test_moe_resume_with_expert_tensor_parallel_below_tp(assets, one_rank, tmp_path):
    """TP2 x EP2 with whole experts (ETP1): the files are Megatron-LM's, the ranks' (TP rank, EP rank) pairs
    (0, 0) and (1, 1) with EP rank 1's experts whole in mp_rank_01_001; a resume with the distributed optimizer
    continues as one rank does, and a run at ETP2 is told which flag differs."""
    layout = Layout("tp2ep2etp1", 4, f"{WHOLE_EXPERTS.flags} --use-distributed-optimizer", tp=2)
    run_moe_dpo(assets, tmp_path, layout, "--train-iters 1")
    saved = sorted(p.name for p in (tmp_path / "iter_0000001").iterdir() if p.is_dir())
    assert saved == ["mp_rank_00_000", "mp_rank_01_001"]
    state = torch.load(tmp_path / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert state["args"]["expert_tensor_parallel_size"] == 1
    fc2 = state["model"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"]
    dense = state["model"]["decoder.layers.0.self_attention.linear_proj.weight"]
    assert fc2.shape[1] == state["args"]["moe_ffn_hidden_size"] and dense.shape[1] * 2 == dense.shape[0]
    rows = run_moe_dpo(assets, tmp_path, layout, "--train-iters 3", load=tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for name in ("loss", *ROUTER):
        assert [r[name] for r in rows[1:]] == pytest.approx([r[name] for r in one_rank[1:3]], abs=1e-5), name
    checkpoint, flags = assets.checkpoint(2, 1)
    args = [*flags, *TRAIN, *DPO.split(), "--data-path", assets.data_prefix, "--tensor-model-parallel-size", "2",
            "--expert-model-parallel-size", "2", "--sequence-parallel", "--load", str(tmp_path), "--train-iters", "4"]
    result = run_cli("pretrain_dpo", args, nproc=4)
    assert result.returncode != 0
    assert "splits each expert over --expert-tensor-parallel-size 1, the run over 2" in result.stdout + result.stderr


def test_moe_lora_with_whole_experts_under_tp2_agrees_and_merges(assets, lora_one_rank, tmp_path):
    """LoRA at TP2 x EP2 x ETP1: the experts' adapters are whole on each rank (their partial gradients summed
    over the experts' TP group, of one rank, not over TP); losses match one rank, and the adapters read back
    from Megatron-LM's two files merge into the same HF experts as the one-rank run's."""
    from safetensors.torch import load_file

    from engine.convert.common import ConvertConfig
    from engine.convert.run import run_conversion

    one, one_save = lora_one_rank
    four = run_moe_dpo(assets, tmp_path / "etp1", WHOLE_EXPERTS, LORA)
    for name in ("loss", *ROUTER):
        assert [r[name] for r in four] == pytest.approx([r[name] for r in one], abs=1e-5), name
    merged = {}
    for run, (base, _), adapters in (("ep1", assets.checkpoint(1, 1), one_save),
                                     ("etp1", assets.checkpoint(2, 1, 1), tmp_path / "etp1")):
        run_conversion(ConvertConfig("mg", "hf", str(base), str(tmp_path / f"hf_{run}"),
                                     lora_load=str(adapters), lora_r=4, lora_alpha=8.0))
        merged[run] = load_file(tmp_path / f"hf_{run}" / "model.safetensors")
    before = load_file(assets.hf / "model.safetensors")
    assert not torch.equal(before["model.layers.1.mlp.experts.3.down_proj.weight"],
                           merged["etp1"]["model.layers.1.mlp.experts.3.down_proj.weight"])
    for key, tensor in merged["ep1"].items():
        torch.testing.assert_close(merged["etp1"][key], tensor, rtol=0, atol=1e-4, msg=key)  # moves are ~2e-2
    # The TP2 x ETP1 adapters as a PEFT adapter (attention's TP shards and the whole experts assembled) on the base
    # HF model give that merged checkpoint's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = assets.checkpoint(2, 1, 1)
    run_conversion(ConvertConfig("mg", "hf", str(base), str(tmp_path / "peft"), lora_load=str(tmp_path / "etp1"),
                                 lora_r=4, lora_alpha=8.0, save_lora_to_hf=True))
    tokens = torch.arange(3, 35).unsqueeze(0)
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    with torch.no_grad():
        expected = load(tmp_path / "hf_etp1")(tokens).logits
        got = PeftModel.from_pretrained(load(assets.hf), tmp_path / "peft").eval()(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
