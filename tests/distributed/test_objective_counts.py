"""Token means over the global batch under data parallelism: two gloo ranks with four pairs each give
the loss and metrics of one process with all eight (the counts are all-reduced once, on the device)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from megatron.core import parallel_state

import engine.dpo.objective as objective_module
from engine.arguments import parse_args
from engine.initialize import initialize_distributed
from tests.distributed.harness import run_ranks
from tests.unit.dpo.test_objective import SPLIT_CASES, eight_pairs, objective, padded, step, step_sums

TINY = "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 32 --vocab-size 16".split()


def fake_logprobs(logits, labels, vocab):
    return logits[..., 0] * (labels != -100)


def data_parallel_steps(cases: list[dict]) -> list[tuple[float, dict[str, float]]]:
    """Per case, this rank's two micro-batches of two pairs, reduced over the data-parallel group like a step."""
    config = parse_args(TINY + "--micro-batch-size 2 --global-batch-size 8".split(), world_size=2)
    initialize_distributed(config.parallel)
    group = parallel_state.get_data_parallel_group()
    rank, pairs = parallel_state.get_data_parallel_rank(), eight_pairs()
    results = []
    for flags in cases:
        micro_batches = [padded(pairs[i:i + 2]) for i in range(4 * rank, 4 * rank + 4, 2)]
        with mock.patch.object(objective_module, "vocab_parallel_logprobs", fake_logprobs), \
                mock.patch.object(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0]):
            totals, count, metrics = step_sums(objective(**flags), micro_batches, group=group)
        names = sorted(metrics)
        reduced = torch.stack([torch.stack([totals.detach(), torch.tensor(float(count), dtype=torch.float64)])]
                              + [metrics[name].double() for name in names])
        torch.distributed.all_reduce(reduced, group=group)
        results.append(((reduced[0, 0] / reduced[0, 1]).item(),
                        {n: (v[0] / v[1]).item() for n, v in zip(names, reduced[1:])}))
    return results


def test_two_data_parallel_ranks_give_the_loss_of_one(monkeypatch):
    monkeypatch.setattr(objective_module, "vocab_parallel_logprobs", fake_logprobs)
    monkeypatch.setattr(objective_module, "vocab_parallel_mean_logits", lambda logits, vocab: logits[..., 0])
    cases = SPLIT_CASES[:3]  # ORPO with and without its prompt loss, CPO
    ranks = run_ranks(data_parallel_steps, 2, cases)
    for flags, *per_rank in zip(cases, *ranks):
        single, single_metrics = step(objective(**flags), [padded(eight_pairs())])
        for loss, metrics in per_rank:
            assert loss == pytest.approx(single.item(), rel=1e-12), flags
            assert metrics == pytest.approx(single_metrics, rel=1e-6), flags
