"""Full <-> per-rank megatron-core state dicts: split rules and exact round trips."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint.layout import stage_files
from engine.checkpoint.sharding import ShardLayout, merge_state_dicts, shard_state_dict


def full_state(num_layers=4, hidden=8, ffn=12, vocab=20, tied=True):
    g = torch.Generator().manual_seed(0)
    state = {"embedding.word_embeddings.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        state[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
        state[p + "self_attention.linear_qkv.weight"] = torch.randn(3 * hidden, hidden, generator=g)
        state[p + "self_attention.linear_qkv.bias"] = torch.randn(3 * hidden, generator=g)
        state[p + "self_attention.linear_proj.weight"] = torch.randn(hidden, hidden, generator=g)
        state[p + "pre_mlp_layernorm.weight"] = torch.randn(hidden, generator=g)
        state[p + "mlp.linear_fc1.weight"] = torch.randn(2 * ffn, hidden, generator=g)
        state[p + "mlp.linear_fc2.weight"] = torch.randn(hidden, ffn, generator=g)
    state["decoder.final_layernorm.weight"] = torch.randn(hidden, generator=g)
    if not tied:
        state["output_layer.weight"] = torch.randn(vocab, hidden, generator=g)
    return state


def shard_all(full, layout):
    vps = range(layout.virtual_pipeline_size) if layout.virtual_pipeline_size else [None]
    return {
        (t, p, v): shard_state_dict(full, layout, t, p, v)
        for t in range(layout.tensor_model_parallel_size)
        for p in range(layout.pipeline_model_parallel_size)
        for v in vps
    }


@pytest.mark.parametrize(
    "layout",
    [
        ShardLayout(4, 2, 1),
        ShardLayout(4, 1, 2),
        ShardLayout(4, 2, 2),
        ShardLayout(4, 2, 2, virtual_pipeline_size=2),
        ShardLayout(4, 1, 2, layers_per_stage=(1, 3)),
        ShardLayout(4, 2, 2, tied_embeddings=False),
    ],
    ids=["tp2", "pp2", "tp2pp2", "pp2vpp2", "uneven", "untied"],
)
def test_shard_then_merge_is_exact(layout):
    full = full_state(tied=layout.tied_embeddings)
    merged = merge_state_dicts(shard_all(full, layout), layout)
    assert merged.keys() == full.keys()
    for key in full:
        assert torch.equal(merged[key], full[key]), key


def test_gated_fc1_splits_gate_and_up_separately():
    full = full_state(num_layers=1, ffn=12)
    layout = ShardLayout(1, 2, 1)
    fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
    gate, up = fc1[:12], fc1[12:]
    rank1 = shard_state_dict(full, layout, 1, 0)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(rank1, torch.cat([gate[6:], up[6:]]))
    proj = shard_state_dict(full, layout, 1, 0)["decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.equal(proj, full["decoder.layers.0.self_attention.linear_proj.weight"][:, 4:])


def test_pipeline_stages_renumber_layers_and_place_embeddings():
    full = full_state()
    layout = ShardLayout(4, 1, 2, padded_vocab_size=24)
    first, last = shard_state_dict(full, layout, 0, 0), shard_state_dict(full, layout, 0, 1)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" in last and "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["decoder.layers.0.input_layernorm.weight"], full["decoder.layers.2.input_layernorm.weight"])
    # The tied output copy on the last stage is the (padded) embedding.
    out = last["output_layer.weight"]
    assert out.shape == (24, 8)
    assert torch.equal(out[:20], full["embedding.word_embeddings.weight"]) and not out[20:].any()


def test_vpp_chunks_take_interleaved_layers():
    layout = ShardLayout(8, 1, 2, virtual_pipeline_size=2)
    assert [list(layout.stage_layers(p, v)) for v in range(2) for p in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_bad_layer_lists_are_rejected():
    with pytest.raises(ValueError, match="must have 2 entries summing to --num-layers 4"):
        ShardLayout(4, 1, 2, layers_per_stage=(1, 2))
    with pytest.raises(ValueError, match="cannot be split evenly"):
        ShardLayout(5, 1, 2)


def moe_state(num_layers=2, hidden=8, ffn=6, experts=4):
    """A dense state whose MLPs are MoE layers: router, routed experts, a shared expert with its gate."""
    g = torch.Generator().manual_seed(1)
    state = {k: v for k, v in full_state(num_layers, hidden).items() if ".mlp." not in k}
    for i in range(num_layers):
        p = f"decoder.layers.{i}.mlp."
        state[p + "router.weight"] = torch.randn(experts, hidden, generator=g)
        state[p + "shared_experts.linear_fc1.weight"] = torch.randn(2 * ffn, hidden, generator=g)
        state[p + "shared_experts.linear_fc2.weight"] = torch.randn(hidden, ffn, generator=g)
        state[p + "shared_experts.gate_weight"] = torch.randn(1, hidden, generator=g)
        for e in range(experts):
            state[p + f"experts.local_experts.{e}.linear_fc1.weight"] = torch.randn(2 * ffn, hidden, generator=g)
            state[p + f"experts.local_experts.{e}.linear_fc2.weight"] = torch.randn(hidden, ffn, generator=g)
    return state


@pytest.mark.parametrize("tp, pp, ep", [(1, 1, 2), (2, 1, 2), (1, 2, 4), (2, 2, 2)])
def test_expert_parallel_shards_hold_their_experts_and_round_trip(tp, pp, ep):
    full = moe_state()
    layout = ShardLayout(2, tp, pp, expert_model_parallel_size=ep, num_experts=4)
    shards = {(t, p, None, e): shard_state_dict(full, layout, t, p, None, e)
              for t in range(tp) for p in range(pp) for e in range(ep)}
    local = 4 // ep
    # EP rank 1 holds experts local..2*local-1, renumbered from 0, each split over TP like a dense MLP.
    key = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"
    expected = full[f"decoder.layers.0.mlp.experts.local_experts.{local}.linear_fc2.weight"].chunk(tp, dim=1)[tp - 1]
    assert torch.equal(shards[(tp - 1, 0, None, 1)][key], expected)
    assert f"decoder.layers.0.mlp.experts.local_experts.{local}.linear_fc1.weight" not in shards[(0, 0, None, 1)]
    # The router and the shared expert's gate are on every EP rank.
    assert torch.equal(shards[(0, 0, None, ep - 1)]["decoder.layers.0.mlp.router.weight"],
                       full["decoder.layers.0.mlp.router.weight"])
    merged = merge_state_dicts(shards, layout)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


@pytest.mark.parametrize("tp, ep, etp, files", [
    (2, 2, 2, [(0, 0), (0, 1), (1, 0), (1, 1)]),  # ETP == TP: every pair
    (2, 2, 1, [(0, 0), (1, 1)]),  # ranks 0-3: TP rank r % 2, EP rank r % 2
    (2, 1, 1, [(0, 0), (1, 0)]),  # Megatron-LM's expert-DP rank 0 writes mp_rank_00 only
    (4, 2, 2, [(0, 0), (1, 0), (2, 1), (3, 1)]),  # EP rank (r // 2) % 2
    (2, 3, 1, [(t, e) for t in range(2) for e in range(3)]),  # period lcm(2, 3) = 6 ranks
])
def test_stage_files_are_the_pairs_training_ranks_hold(tp, ep, etp, files):
    assert stage_files(tp, ep, etp) == files


@pytest.mark.parametrize("tp, pp, ep, etp", [(2, 1, 2, 1), (2, 1, 1, 1), (4, 2, 2, 2), (2, 2, 4, 1)])
def test_expert_tensor_parallel_below_tp_shards_and_round_trips(tp, pp, ep, etp):
    full = moe_state(ffn=8)
    layout = ShardLayout(2, tp, pp, expert_model_parallel_size=ep, num_experts=4, expert_tensor_parallel_size=etp)
    shards = {(t, p, None) + ((e,) if ep > 1 else ()): shard_state_dict(full, layout, t, p, None, e)
              for t, e in layout.files for p in range(pp)}
    local = 4 // ep
    for t, e in layout.files:
        shard = shards[(t, 0, None) + ((e,) if ep > 1 else ())]
        # The dense MLP parts follow TP; a routed expert is expert-TP rank t % ETP's slice of it.
        assert torch.equal(shard["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"],
                           full["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"].chunk(tp, dim=1)[t])
        expert = full[f"decoder.layers.0.mlp.experts.local_experts.{e * local}.linear_fc2.weight"]
        assert torch.equal(shard["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"],
                           expert.chunk(etp, dim=1)[t % etp])
    merged = merge_state_dicts(shards, layout)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_expert_tensor_parallel_must_divide_tp():
    with pytest.raises(ValueError, match="expert tensor-parallel size 2 does not divide the tensor-parallel size 1"):
        ShardLayout(2, 1, 1, expert_model_parallel_size=2, num_experts=4, expert_tensor_parallel_size=2)
