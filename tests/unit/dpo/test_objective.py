"""The objective's NLL readings, reward and log-prob metrics, and token means over the global batch.

A fake model makes every hand value readable: the log-prob of a target token is -0.1 x its id (the
reference's -0.05 x its id), whatever the layout. Pairs A and B (prompt | chosen | rejected):

    A: 5 6 | 7 8 9 | 2 3      chosen answer sum -2.4 (3 tokens), prompt target 6: -0.6 (1 token)
    B: 1 2 3 | 4 | 1 1        chosen answer sum -0.4 (1 token), prompt targets 2 3: -0.5 (2 tokens)

so the chosen NLL is 3.9 / 7 over prompt and answer tokens (ORPO, TRL), 2.8 / 4 over answer tokens
(CPO, TRL's sft), and (0.8 + 0.4) / 2 = 0.6 as a token mean per pair (RPO). Rejected answer sums:
-0.5 and -0.2 (2 tokens each).
"""

from __future__ import annotations

import math
from operator import attrgetter

import numpy as np
import pytest
import torch

import engine.dpo.objective as objective_module
from engine.arguments import PreferenceConfig
from engine.data.collate import collate_pairs, pack_pairs
from engine.dpo.objective import PairwiseObjective
from engine.dpo.stages import build_objective
from tests.output_rows import at_outputs

M = -100


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    a = np.asarray
    return {"chosen_input_ids": a(prompt + chosen), "chosen_labels": a([M] * len(prompt) + chosen),
            "rejected_input_ids": a(prompt + rejected), "rejected_labels": a([M] * len(prompt) + rejected)}


def padded(pairs: list[dict], shards: int = 1):
    """Padded rows, with the prompt positions selected too (ORPO's prompt loss; other objectives ignore them)."""
    return collate_pairs(pairs, shards=shards, prompt_targets=True)


def packed(pairs: list[dict], shards: int = 1):
    return pack_pairs(pairs, shards=shards, prompt_targets=True)


A, B = pair([5, 6], [7, 8, 9], [2, 3]), pair([1, 2, 3], [4], [1, 1])


@pytest.fixture(autouse=True)
def fake_model(monkeypatch):
    """Token log-probs are logits[..., 0] at the positions with a target (no TP group needed)."""
    monkeypatch.setattr(objective_module, "vocab_parallel_logprobs",
                        lambda logits, labels, vocab: logits[..., 0] * (labels != M))
    monkeypatch.setattr(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])


def logits(batch, scale=-0.1, weight: torch.Tensor | None = None) -> torch.Tensor:
    """scale x the id of the next input token at every position: the same per target in any layout."""
    values = scale * batch.tokens.roll(-1, dims=-1).double()
    return at_outputs((values if weight is None else values * weight).unsqueeze(-1), batch)


def objective(**flags) -> PairwiseObjective:
    return build_objective(PreferenceConfig(**flags), vocab_size=16)


def step_sums(obj: PairwiseObjective, micro_batches: list, weight: torch.Tensor | None = None, group=None):
    """One rank's part of a global batch: (loss sum, pair count, each metric's (sum, count))."""
    obj.share_global_counts(micro_batches, group)
    totals, pairs, metrics = 0.0, 0, {}
    for batch in micro_batches:
        reference = obj._reference_logps(batch, logits(batch, -0.05)) if obj.preference.uses_reference else None
        loss, count, mb_metrics = obj.loss_func(batch, reference, logits(batch, weight=weight))
        totals, pairs = totals + loss, pairs + int(count)
        for name, value in mb_metrics.items():
            metrics[name] = metrics.get(name, 0) + value
    return totals, pairs, metrics


def step(obj: PairwiseObjective, micro_batches: list, weight: torch.Tensor | None = None):
    """One global batch as megatron reduces it: loss sums over the pair count, metrics (sum, sum)."""
    totals, pairs, metrics = step_sums(obj, micro_batches, weight)
    return totals / pairs, {name: (v[0] / v[1]).item() for name, v in metrics.items()}


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def orpo_term(a_c: float, a_r: float, lam: float = 0.1) -> float:
    odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
    return lam * softplus(-odds)


@pytest.mark.parametrize("collate", [padded, packed])
def test_orpo_nll_covers_prompt_and_answer_tokens_of_the_batch(collate):
    batch = collate([A, B])
    loss, metrics = step(objective(stage="orpo"), [batch])
    odds_terms = (orpo_term(-0.8, -0.25) + orpo_term(-0.4, -0.1)) / 2  # token means of the answers
    assert metrics["nll_loss"] == pytest.approx(3.9 / 7)
    assert loss.item() == pytest.approx(3.9 / 7 + odds_terms)
    # --no-orpo-prompt-loss: the answer tokens only, still a mean over the batch's tokens
    loss, metrics = step(objective(stage="orpo", orpo_prompt_loss=False), [collate([A, B])])
    assert metrics["nll_loss"] == pytest.approx(2.8 / 4)
    assert loss.item() == pytest.approx(2.8 / 4 + odds_terms)
    # TRL's ORPO names and values: logps/* are the token means its loss takes, rewards/* beta x the sums
    assert metrics["logps/chosen"] == pytest.approx((-0.8 - 0.4) / 2)
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * (-2.4 - 0.4) / 2)


def test_prompt_targets_are_the_next_input_token_up_to_the_last_answer_position():
    for collate in (collate_pairs, pack_pairs):
        answers = collate([A, B]).outputs
        assert sorted(answers.targets[0].tolist()) == [1, 1, 2, 3, 4, 7, 8, 9]
        assert (answers.answer_ordinal > 0).all()
        rows = collate([A, B], prompt_targets=True).outputs
        answer = rows.answer_ordinal > 0
        assert sorted(rows.targets[answer].tolist()) == sorted(answers.targets[0].tolist())
        chosen = rows.sequence_ids < 2
        assert sorted(rows.targets[chosen].tolist()) == [2, 3, 4, 6, 7, 8, 9]
        assert int((~chosen).sum()) == 3 + 4  # rejected lengths 4 and 5, less one each


def test_cpo_and_sft_average_the_nll_over_the_batch_tokens_and_rpo_per_pair():
    batch = [padded([A, B])]
    nll_tokens, nll_pairs = 2.8 / 4, 0.6
    # CPO sigmoid on summed log-probs, margins -1.9 and -0.2, plus the batch-token NLL (TRL's CPOTrainer)
    loss, metrics = step(objective(stage="cpo"), batch)
    assert loss.item() == pytest.approx((softplus(0.19) + softplus(0.02)) / 2 + nll_tokens)
    assert metrics["nll_loss"] == pytest.approx(nll_tokens)
    # CPO-IPO: on token means (margins -0.55, -0.3); logps/* are those means, rewards/* beta x the sums
    loss, metrics = step(objective(stage="cpo", dpo_loss_type="ipo"), batch)
    assert loss.item() == pytest.approx(((-0.55 - 5) ** 2 + (-0.3 - 5) ** 2) / 2 + nll_tokens)
    assert metrics["logps/chosen"] == pytest.approx(-0.6) and metrics["logps/rejected"] == pytest.approx(-0.175)
    assert metrics["rewards/chosen"] == pytest.approx(-0.14) and metrics["rewards/rejected"] == pytest.approx(-0.035)
    # SimPO logs no NLL while its weight is 0, and the batch-token NLL with --cpo-alpha
    assert "nll_loss" not in step(objective(stage="simpo"), batch)[1]
    assert step(objective(stage="simpo", cpo_alpha=0.5), batch)[1]["nll_loss"] == pytest.approx(nll_tokens)
    # DPO: TRL's sft term averages over the batch's tokens; --rpo-alpha is the RPO paper's per-pair mean
    dpo_margins = [0.1 * (-2.4 + 1.2 + 0.5 - 0.25), 0.1 * (-0.4 + 0.2 + 0.2 - 0.1)]
    sigmoid = sum(softplus(-h) for h in dpo_margins) / 2
    loss, _ = step(objective(dpo_loss_type=["sigmoid", "sft"]), batch)
    assert loss.item() == pytest.approx(sigmoid + nll_tokens)
    loss, metrics = step(objective(rpo_alpha=1.0), batch)
    assert loss.item() == pytest.approx(sigmoid + nll_pairs) and metrics["nll_loss"] == pytest.approx(nll_pairs)


def test_rewards_are_beta_times_summed_log_ratios_whatever_the_loss_normalizes():
    # chosen 2 2 2 (3 tokens), rejected 3 (1 token): log-ratios -0.05 x ids, sums -0.3 and -0.15,
    # token means -0.1 and -0.15. Summed rewards rank the rejected answer higher, means the chosen one.
    batch = [padded([pair([1], [2, 2, 2], [3])])]
    for loss_type, expected in (("ipo", (0.05 - 5) ** 2), ("sigmoid_norm", softplus(-0.1 * 0.05))):
        loss, metrics = step(objective(dpo_loss_type=loss_type), batch)
        assert loss.item() == pytest.approx(expected)
        assert metrics["rewards/chosen"] == pytest.approx(0.1 * -0.3)
        assert metrics["rewards/rejected"] == pytest.approx(0.1 * -0.15)
        assert metrics["rewards/accuracies"] == 0.0
        assert metrics["logps/chosen"] == pytest.approx(-0.6)  # DPOTrainer logs the sums
    # LD-DPO: logps/* and rewards/* are the desensitized sums the loss uses (TRL): the shorter answer has
    # 1 token, so the chosen's last two are scaled by 0.5: policy -0.2 - 0.5 x 0.4, reference half of it
    loss, metrics = step(objective(ld_alpha=0.5), batch)
    assert metrics["logps/chosen"] == pytest.approx(-0.4)
    assert metrics["rewards/chosen"] == pytest.approx(0.1 * -0.2)


SPLIT_CASES = [
    {"stage": "orpo"},
    {"stage": "orpo", "orpo_prompt_loss": False},
    {"stage": "cpo"},
    {"stage": "cpo", "dpo_loss_type": "simpo"},
    {"stage": "simpo", "cpo_alpha": 0.5},
    {"dpo_loss_type": ["sigmoid", "sft"]},
    {"rpo_alpha": 0.5},
]


def eight_pairs() -> list[dict]:
    rng = np.random.default_rng(0)
    return [pair(rng.integers(1, 16, p).tolist(), rng.integers(1, 16, c).tolist(), rng.integers(1, 16, r).tolist())
            for p, c, r in [(2, 3, 1), (5, 1, 4), (1, 7, 2), (3, 2, 2), (4, 6, 1), (2, 1, 5), (6, 4, 3), (1, 2, 8)]]


@pytest.mark.parametrize("flags", SPLIT_CASES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("collate", [padded, packed])
def test_one_micro_batch_of_8_and_four_of_2_give_the_same_loss_gradient_and_metrics(flags, collate):
    pairs = eight_pairs()
    results = []
    for size in (8, 2):
        weight = torch.ones((), dtype=torch.float64, requires_grad=True)
        loss, metrics = step(objective(**flags), [collate(pairs[i:i + size]) for i in range(0, 8, size)], weight)
        loss.backward()
        results.append((loss.item(), weight.grad.item(), metrics))
    (loss1, grad1, metrics1), (loss4, grad4, metrics4) = results
    assert loss4 == pytest.approx(loss1, rel=1e-12) and grad4 == pytest.approx(grad1, rel=1e-12)
    assert metrics4 == pytest.approx(metrics1, rel=1e-6)  # metrics are float32 (sum, count) pairs


@pytest.mark.parametrize("flags", [{}, {"dpo_loss_type": "bco_pair"}, {"ld_alpha": 0.5}, *SPLIT_CASES],
                         ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_the_declared_metric_names_are_those_the_loss_returns(flags):
    obj = objective(**flags)
    _, _, metrics = step_sums(obj, [packed([A, B])])
    assert obj.metric_names == tuple(sorted(metrics))


def test_a_mean_of_micro_batch_means_would_differ_and_missing_counts_are_an_error():
    pairs, obj = eight_pairs(), objective(stage="orpo")
    whole, _ = step(obj, [padded(pairs)])
    parts = [padded(pairs[i:i + 2]) for i in range(0, 8, 2)]
    each_alone = sum(step(obj, [part])[0] for part in parts) / 4  # every micro-batch its own batch
    assert abs(each_alone.item() - whole.item()) > 1e-3
    with pytest.raises(ValueError, match="share_global_counts"):
        obj.loss_func(padded(pairs), None, logits(padded(pairs)))


# -- per-sequence sums: exact and free of atomics -------------------------------------------------------------

def long_pairs(seed: int = 1) -> tuple[list[dict], np.ndarray]:
    """Six pairs of answers up to 700 tokens (a packed row of about 5000 tokens), and a float32 log-prob per
    token id: the fake model gives each target that value, so every layout sees the same numbers."""
    rng = np.random.default_rng(seed)
    lengths = [(40, 700, 650), (3, 1, 500), (120, 333, 2), (7, 64, 65), (1, 600, 599), (90, 10, 400)]
    pairs = [pair(rng.integers(1, 1000, p).tolist(), rng.integers(1, 1000, c).tolist(),
                  rng.integers(1, 1000, r).tolist()) for p, c, r in lengths]
    return pairs, -rng.uniform(0.0, 12.0, 1000).astype(np.float32)


def reference_sums(pairs: list[dict], table: np.ndarray) -> dict[str, list[float]]:
    """float64 sums straight from the samples: answer targets, the first k of them (k the pair's shorter
    answer, LD-DPO), prompt targets (the prompt's tokens after its first)."""
    values = table.astype(np.float64)
    sums = {"total": [], "shared": [], "prompt_total": []}
    for side in ("chosen", "rejected"):
        for sample in pairs:
            ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
            prompt = int((labels == M).sum())
            shorter = min(int((sample[f"{s}_labels"] != M).sum()) for s in ("chosen", "rejected"))
            sums["total"].append(values[ids[prompt:]].sum())
            sums["shared"].append(values[ids[prompt:prompt + shorter]].sum())
            sums["prompt_total"].append(values[ids[1:prompt]].sum())
    return sums


@pytest.mark.parametrize("shards", [1, 4])
@pytest.mark.parametrize("collate", [padded, packed])
def test_sequence_sums_equal_a_float64_reference(collate, shards):
    """Whichever shards (sequence-parallel ranks) select the positions, each one's target is scored once."""
    pairs, table = long_pairs()
    batch = collate(pairs, shards)
    token_values = at_outputs(torch.from_numpy(table)[batch.tokens.roll(-1, dims=-1)].unsqueeze(-1), batch)  # float32
    logps = objective(ld_alpha=0.5).sequence_logps(token_values, batch)
    logps.prompt_total, logps.prompt_count = attrgetter("prompt_total", "prompt_count")(
        objective(stage="orpo").sequence_logps(token_values, batch))
    for name, reference in reference_sums(pairs, table).items():
        got = getattr(logps, name)
        assert got.dtype == torch.float32
        # float32 keeps 24 bits: a sum of up to 700 terms, each rounded once on the way, stays within 1e-6
        assert got.double().numpy() == pytest.approx(reference, rel=1e-6, abs=1e-6), name
    answers = [int((s[f"{side}_labels"] != M).sum()) for side in ("chosen", "rejected") for s in pairs]
    assert logps.count.tolist() == answers
    assert logps.prompt_count.tolist() == [int((s[f"{side}_labels"] == M).sum()) - 1
                                           for side in ("chosen", "rejected") for s in pairs]


ATOMIC_OPS = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
              "index_reduce", "index_reduce_", "put_", "_index_put_impl_", "index_put_", "index_put"}
"""aten ops that accumulate into shared slots (atomically on CUDA), and the backward of gathers, which is one."""


@pytest.mark.parametrize("collate", [padded, packed])
def test_sequence_sums_use_no_accumulating_scatter_forward_or_backward(collate):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[tuple[str, torch.dtype | None]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.ops.append((func.overloadpacket.__name__, first.dtype if first is not None else None))
            return func(*args, **(kwargs or {}))

    pairs, table = long_pairs()
    batch = collate(pairs[:3])
    values = at_outputs(torch.from_numpy(table)[batch.tokens.roll(-1, dims=-1)].unsqueeze(-1), batch).requires_grad_()
    with Recorder() as recorder:
        shared = objective(ld_alpha=0.5).sequence_logps(values, batch).shared
        prompt = objective(stage="orpo").sequence_logps(values, batch).prompt_total
        forward_ops = len(recorder.ops)
        (shared.sum() + prompt.sum()).backward()
    assert len(recorder.ops) > forward_ops  # backward ran under the recorder too
    assert not {name for name, _ in recorder.ops} & ATOMIC_OPS
    # CUDA's floating-point cumsum is nondeterministic (torch refuses it under deterministic algorithms)
    assert all(not dtype.is_floating_point for name, dtype in recorder.ops if name == "cumsum")
    assert values.grad is not None and torch.isfinite(values.grad).all()
