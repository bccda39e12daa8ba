"""Layout parity: the same weights give the same logits, losses and grad norms under TP/PP/DP.

One matrix per property, declared as data and run by the shared harness.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import Layout, layout_cases, run_ranks
from tests.distributed.workers import forward_logits, lm_train_steps, save_initial_state

# Tied embeddings, GQA, qkv bias and qk-norm: the Qwen2/Qwen3 corner of the families.
QWEN_LIKE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
             "--num-query-groups 2 --ffn-hidden-size 96 --seq-length 16 --vocab-size 120 "
             "--make-vocab-size-divisible-by 16 --swiglu --disable-bias-linear --add-qkv-bias "
             "--qk-layernorm --rotary-base 1000000 --norm-epsilon 1e-6 "
             "--micro-batch-size 1 --global-batch-size 2").split()
# Untied output layer, llama3 rope scaling: the Llama corner.
LLAMA_LIKE = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention "
              "--num-query-groups 2 --ffn-hidden-size 96 --seq-length 16 --vocab-size 120 "
              "--make-vocab-size-divisible-by 16 --swiglu --disable-bias-linear "
              "--untie-embeddings-and-output-weights --rope-scaling-type llama3 --rope-scaling-factor 8 "
              "--original-max-position-embeddings 8").split()

FORWARD_LAYOUTS = [
    Layout("tp2", 2, "--tensor-model-parallel-size 2"),
    Layout("tp2sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    Layout("pp2", 2, "--pipeline-model-parallel-size 2"),
    Layout("tp2pp2", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
    Layout("pp2vpp2", 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
]


@pytest.fixture(scope="module")
def qwen_state(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("state") / "qwen_like.pt")
    run_ranks(save_initial_state, 1, QWEN_LIKE, path)
    return path


TOKENS = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def single_rank_logits(qwen_state):
    logits = run_ranks(forward_logits, 1, QWEN_LIKE, qwen_state, TOKENS)[0]
    assert logits.shape == (2, 12, 120)
    return logits


@layout_cases(FORWARD_LAYOUTS)
def test_forward_logits_agree_across_layouts(layout, qwen_state, single_rank_logits):
    outputs = [o for o in run_ranks(forward_logits, layout.ranks, QWEN_LIKE + layout.argv, qwen_state, TOKENS)
               if o is not None]
    assert len(outputs) == 1
    diff = (outputs[0] - single_rank_logits).abs().max().item()
    assert diff <= 1e-5, f"max abs logit diff {diff:.2e}"


SAMPLES = torch.randint(0, 120, (8, 13), generator=torch.Generator().manual_seed(1))
TRAIN_COMMON = LLAMA_LIKE + ("--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 "
                             "--lr-decay-style constant --clip-grad 1.0 --use-distributed-optimizer").split()
TRAIN_LAYOUTS = [
    Layout("tp2pp2dp2sp", 8, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel"),
    # Interleaved 1F1B on two pipeline ranks: activations and gradients share a peer (see provider.py).
    Layout("pp2vpp2", 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
    # Activation recomputation changes memory, not numerics.
    Layout("recompute_full", 1, "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"),
    Layout("recompute_selective", 1, "--recompute-granularity selective"),
]


@pytest.fixture(scope="module")
def llama_single_rank(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("state") / "llama_like.pt")
    run_ranks(save_initial_state, 1, LLAMA_LIKE, path)
    losses, norms = [o for o in run_ranks(lm_train_steps, 1, TRAIN_COMMON, path, SAMPLES, 3) if o][0]
    assert losses[2] < losses[1] < losses[0]
    return path, losses, norms


@layout_cases(TRAIN_LAYOUTS)
def test_train_steps_agree_with_one_rank(layout, llama_single_rank):
    path, losses, norms = llama_single_rank
    outputs = [o for o in run_ranks(lm_train_steps, layout.ranks, TRAIN_COMMON + layout.argv, path, SAMPLES, 3) if o]
    assert len(outputs) == 1
    got_losses, got_norms = outputs[0]
    # The first loss and norm agree, and so do the later losses, computed on the updated weights.
    assert got_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert got_norms == pytest.approx(norms, rel=1e-5)
    if layout.name.startswith("recompute"):
        assert (got_losses, got_norms) == (losses, norms)  # bit-identical
