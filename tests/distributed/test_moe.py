"""Mixture of experts under expert parallelism: the same weights and batch give the same losses, gradient
norms and router losses on one rank and under EP, TP x EP, PP x EP, DP x EP, with either token dispatcher."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_ranks
from tests.distributed.workers import moe_train_steps, save_initial_state

# 4 experts, top-2, a shared expert with its sigmoid gate (Qwen2-MoE's corner); the router losses are on.
TINY_MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
            "--ffn-hidden-size 64 --seq-length 16 --vocab-size 120 --make-vocab-size-divisible-by 16 --swiglu "
            "--disable-bias-linear --untie-embeddings-and-output-weights --num-experts 4 --moe-router-topk 2 "
            "--moe-ffn-hidden-size 48 --moe-shared-expert-intermediate-size 32 --moe-shared-expert-gate "
            "--moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001 "
            "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --lr-decay-style constant "
            "--use-distributed-optimizer").split()
SAMPLES = torch.randint(0, 120, (8, 13), generator=torch.Generator().manual_seed(3))
STEPS = 3
LAYOUTS = [
    Layout("ep2", 2, "--expert-model-parallel-size 2"),
    Layout("ep2_allgather", 2, "--expert-model-parallel-size 2 --moe-token-dispatcher-type allgather"),
    Layout("tp2ep2", 4, "--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2"),
    Layout("pp2ep2", 4, "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2"),
]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("moe") / "state.pt")
    run_ranks(save_initial_state, 1, TINY_MOE, path)
    rows = run_ranks(moe_train_steps, 1, TINY_MOE, path, SAMPLES, STEPS)[0]
    losses = [row["lm loss"] for row in rows]
    assert losses[2] < losses[0]
    for row in rows:  # the router losses were computed and logged: positive, a balanced router's lb loss ~ 1
        assert 0.5 < row["moe/load_balancing_loss"] < 4 and row["moe/z_loss"] > 0
    return path, rows


@layout_cases(LAYOUTS)
def test_moe_training_agrees_with_one_rank(layout, one_rank):
    path, expected = one_rank
    outputs = [o for o in run_ranks(moe_train_steps, layout.ranks, TINY_MOE + layout.argv, path, SAMPLES, STEPS) if o]
    assert len(outputs) == 1
    for step, (got, want) in enumerate(zip(outputs[0], expected)):
        assert set(got) == set(want)
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), f"step {step + 1} {name}"
