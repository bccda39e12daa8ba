"""Layout parity: the same weights give the same logits, losses and grad norms under TP/PP/DP.

One matrix per property, declared as data and run by the shared harness.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks
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

FORWARD_LAYOUTS = [  # (name, world size, flags)
    ("tp2", 2, "--tensor-model-parallel-size 2"),
    ("tp2sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    ("tp2pp2", 4, "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2"),
    ("pp2vpp2", 2, "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1"),
]


@pytest.fixture(scope="module")
def qwen_state(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("state") / "qwen_like.pt")
    run_ranks(save_initial_state, 1, QWEN_LIKE, path)
    return path


def test_forward_logits_agree_across_layouts(qwen_state):
    tokens = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = run_ranks(forward_logits, 1, QWEN_LIKE, qwen_state, tokens)[0]
    assert reference.shape == (2, 12, 120)
    for name, world, flags in FORWARD_LAYOUTS:
        outputs = [o for o in run_ranks(forward_logits, world, QWEN_LIKE + flags.split(), qwen_state, tokens)
                   if o is not None]
        assert len(outputs) == 1, name
        diff = (outputs[0] - reference).abs().max().item()
        assert diff <= 1e-5, f"{name}: max abs logit diff {diff:.2e}"


def test_train_step_agrees_between_tp1pp1dp1_and_tp2pp2dp2_sp(tmp_path):
    path = str(tmp_path / "llama_like.pt")
    run_ranks(save_initial_state, 1, LLAMA_LIKE, path)
    samples = torch.randint(0, 120, (8, 13), generator=torch.Generator().manual_seed(1))
    common = LLAMA_LIKE + ("--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 "
                           "--lr-decay-style constant --clip-grad 1.0 --use-distributed-optimizer").split()
    single = [o for o in run_ranks(lm_train_steps, 1, common, path, samples, 3) if o][0]
    layout = "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel".split()
    sharded = [o for o in run_ranks(lm_train_steps, 8, common + layout, path, samples, 3) if o]
    assert len(sharded) == 1
    (loss1, norm1), (loss8, norm8) = single, sharded[0]
    assert loss1[0] == pytest.approx(loss8[0], rel=1e-5, abs=1e-6)
    assert norm1[0] == pytest.approx(norm8[0], rel=1e-5)
    # The updates agree too: later losses are computed on the updated weights.
    assert loss1[1:] == pytest.approx(loss8[1:], rel=1e-5, abs=1e-6)
    assert loss1[2] < loss1[1] < loss1[0]
    # Interleaved 1F1B on two pipeline ranks: activations and gradients share a peer (see provider.py).
    vpp = "--pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1".split()
    interleaved = [o for o in run_ranks(lm_train_steps, 2, common + vpp, path, samples, 3) if o][0]
    assert interleaved[0] == pytest.approx(loss1, rel=1e-5, abs=1e-6)
    assert interleaved[1] == pytest.approx(norm1, rel=1e-5)
    # Activation recomputation changes memory, not numerics.
    for recompute in ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 1",
                      "--recompute-granularity selective"):
        again = [o for o in run_ranks(lm_train_steps, 1, common + recompute.split(), path, samples, 3) if o][0]
        assert again == (loss1, norm1), recompute
