"""Model FLOPs per sequence (an MoE layer costs its active experts, not all of them) and the metrics files."""

from __future__ import annotations

import pytest

from engine.arguments import ModelConfig, MoEConfig
from engine.training.metrics import forward_flops


def test_moe_flops_count_the_routed_top_k_the_shared_expert_and_the_router():
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, ffn_hidden_size=64,
                        swiglu=True, vocab_size=100)
    moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24, moe_shared_expert_intermediate_size=16)
    s, h = 10, 32
    # per layer: q/k/v and out projections (4 x h x h), scores and values (2 x s x h), SwiGLU MLP of width
    # 2 x 24 + 16 = 64 active (3 matrices), the router (h x 8)
    per_layer = 2 * s * h * 3 * h + 2 * s * s * h + 2 * s * h * h + 2 * s * h * (64 * 3 + 8)
    assert forward_flops(model, 128, s, moe=moe) == 2 * per_layer + 2 * s * h * 128
    dense_same_active = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                                    ffn_hidden_size=64, swiglu=True, vocab_size=100)
    assert forward_flops(model, 128, s, moe=moe) - forward_flops(dense_same_active, 128, s) == 2 * (2 * s * h * 8)
    assert forward_flops(model, 128, s, moe=MoEConfig()) == forward_flops(model, 128, s)  # dense: unchanged


def test_dense_layers_of_an_moe_model_cost_their_dense_mlp():
    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, ffn_hidden_size=64,
                        swiglu=True, vocab_size=100)
    moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=24, moe_layer_freq=[0, 1, 1, 0])
    s, h = 10, 32
    attention = 2 * s * h * 3 * h + 2 * s * s * h + 2 * s * h * h
    dense_mlp, moe_mlp = 2 * s * h * 64 * 3, 2 * s * h * (2 * 24 * 3 + 8)
    assert forward_flops(model, 128, s, moe=moe) == 4 * attention + 2 * dense_mlp + 2 * moe_mlp + 2 * s * h * 128


def test_the_logger_writes_jsonl_rows_and_tensorboard_tags_by_split(tmp_path):
    """README "Metrics": one JSON object per line with split and iteration, TensorBoard train/<name>, valid/<name>;
    a non-finite value stays in the JSONL (as its JSON) but is no TensorBoard point."""
    import json
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.training.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path / "save"), str(tmp_path / "tb"), enabled=True)
    logger.log(1, {"loss": 0.69, "rewards/margins": 0.0})
    logger.log(2, {"loss": math.nan, "rewards/margins": 0.5})
    logger.log(2, {"loss": 0.6}, split="valid")
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in rows] == [("train", 1), ("train", 2), ("valid", 2)]
    assert math.isnan(rows[1]["loss"]) and rows[2]["loss"] == 0.6
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    points = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert points == {"train/loss": [(1, pytest.approx(0.69))], "train/rewards/margins": [(1, 0.0), (2, 0.5)],
                      "valid/loss": [(2, pytest.approx(0.6))]}
    assert MetricsLogger(str(tmp_path / "other"), None, enabled=False).jsonl is None  # ranks other than 0 write nothing
