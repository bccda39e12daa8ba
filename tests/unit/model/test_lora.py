"""LoRA layers on megatron-core's TP linears: math against plain torch, TP1 = TP2 = TP2 + sequence parallel."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks

IN, HIDDEN, OUT, R, ALPHA = 16, 24, 16, 4, 8.0
SEQ, BATCH = 8, 2


def _full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(HIDDEN, IN, generator=g) * 0.2,
        "w2": torch.randn(OUT, HIDDEN, generator=g) * 0.2,
        "b1": torch.randn(HIDDEN, R, generator=g) * 0.2,  # nonzero B: a trained adapter
        "b2": torch.randn(OUT, R, generator=g) * 0.2,
        "x": torch.randn(SEQ, BATCH, IN, generator=g),
        "probe": torch.randn(SEQ, BATCH, OUT, generator=g),
    }


def _lora_mlp(tp: int, sp: bool) -> dict[bool, dict]:
    """x -> LoRA column-parallel -> gelu -> LoRA row-parallel, on `tp` ranks, with fresh (B = 0) and
    trained adapters; outputs and grads as full tensors."""
    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed

    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp))
    return {trained: _run_lora_mlp(tp, sp, trained) for trained in (False, True)}


def _run_lora_mlp(tp: int, sp: bool, trained: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from megatron.core.transformer import TransformerConfig

    from engine.model.lora import (
        LoraColumnParallelLinear, LoraRowParallelLinear, LoraSettings, adapters_disabled,
        allreduce_partial_adapter_grads,
    )

    rank = parallel_state.get_tensor_model_parallel_rank()
    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=2, tensor_model_parallel_size=tp,
                               sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False)
    lora = LoraSettings(R, ALPHA)
    init = torch.nn.init.zeros_
    col = LoraColumnParallelLinear(IN, HIDDEN, config=config, init_method=init, bias=False, gather_output=False,
                                   lora=lora)
    row = LoraRowParallelLinear(HIDDEN, OUT, config=config, init_method=init, bias=False, input_is_parallel=True,
                                skip_bias_add=False, lora=lora)
    t = _full_tensors()
    with torch.no_grad():
        col.weight.copy_(t["w1"].chunk(tp, 0)[rank])
        row.weight.copy_(t["w2"].chunk(tp, 1)[rank])
    col.reset_adapters(torch.Generator().manual_seed(1), rank)
    row.reset_adapters(torch.Generator().manual_seed(2), rank)
    if trained:
        with torch.no_grad():
            col.lora_B.weight.copy_(t["b1"].chunk(tp, 0)[rank])
            row.lora_B.weight.copy_(t["b2"])
    for module in (col, row):
        module.weight.requires_grad_(False)
    x = t["x"].chunk(tp, 0)[rank] if sp else t["x"]
    x = x.clone().requires_grad_(True)

    def forward():
        hidden, _ = col(x)
        out, _ = row(torch.nn.functional.gelu(hidden))
        return out

    with adapters_disabled([col, row]):
        base = forward().detach()
    out = forward()
    probe = t["probe"].chunk(tp, 0)[rank] if sp else t["probe"]
    (out * probe).sum().backward()
    allreduce_partial_adapter_grads([col, row])
    group = parallel_state.get_tensor_model_parallel_group()

    def gather(tensor, dim):
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim)

    if sp:
        base, out = gather_from_sequence_parallel_region(base), gather_from_sequence_parallel_region(out.detach())
        x_grad = gather(x.grad, 0)
    else:
        x_grad = x.grad
    return {
        "base": base, "out": out.detach(), "x_grad": x_grad,
        "col_A": col.lora_A.weight.grad, "col_B": gather(col.lora_B.weight.grad, 0),
        "row_A": gather(row.lora_A.weight.grad, 1), "row_B": row.lora_B.weight.grad,
        "A1": col.lora_A.weight.detach(), "A2": gather(row.lora_A.weight.detach(), 1),
        "frozen_grads": [p.grad for p in (col.weight, row.weight)],
    }


def _torch_reference(a1: torch.Tensor, a2: torch.Tensor, trained: bool) -> dict[str, torch.Tensor]:
    t = _full_tensors()
    scale = ALPHA / R
    b1 = t["b1"] if trained else torch.zeros(HIDDEN, R)
    b2 = t["b2"] if trained else torch.zeros(OUT, R)
    params = {"col_A": a1.clone(), "col_B": b1.clone(), "row_A": a2.clone(), "row_B": b2.clone()}
    for p in params.values():
        p.requires_grad_(True)
    x = t["x"].clone().requires_grad_(True)
    h = x @ t["w1"].T + scale * (x @ params["col_A"].T) @ params["col_B"].T
    g = torch.nn.functional.gelu(h)
    out = g @ t["w2"].T + scale * (g @ params["row_A"].T) @ params["row_B"].T
    (out * t["probe"]).sum().backward()
    base = torch.nn.functional.gelu(x.detach() @ t["w1"].T) @ t["w2"].T
    return {"base": base, "out": out.detach(), "x_grad": x.grad, **{k: p.grad for k, p in params.items()}}


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict[bool, dict]]:
    return {
        "tp1": run_ranks(_lora_mlp, 1, 1, False)[0],
        "tp2": run_ranks(_lora_mlp, 2, 2, False)[0],
        "tp2sp": run_ranks(_lora_mlp, 2, 2, True)[0],
    }


@pytest.mark.parametrize("trained", [False, True])
def test_lora_layers_match_torch_at_tp1_tp2_and_tp2_sequence_parallel(layouts, trained):
    results = {name: runs[trained] for name, runs in layouts.items()}
    tp1 = results["tp1"]
    expected = _torch_reference(tp1["A1"], tp1["A2"], trained)
    if not trained:  # fresh adapters (B = 0) leave the output unchanged
        assert torch.equal(tp1["out"], tp1["base"])
    for name, got in results.items():
        assert got["frozen_grads"] == [None, None], name  # base weights get no grads
        # The same full adapters at any TP size: initialized whole from one generator, then sliced.
        assert torch.equal(got["A1"], tp1["A1"]) and torch.equal(got["A2"], tp1["A2"]), name
        for key in ("base", "out", "x_grad", "col_A", "col_B", "row_A", "row_B"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


def test_lora_flags_are_validated_with_errors_that_name_the_flag():
    from engine.arguments import ConfigError, LoraConfig, parse_args

    base = "--num-layers 2 --hidden-size 8 --num-attention-heads 2 --seq-length 8 --vocab-size 10".split()
    config = parse_args([*base, "--lora-r", "4", "--lora-target-modules", "linear_qkv"], world_size=1)
    assert config.lora.enabled and config.lora.lora_target_modules == ["linear_qkv"]
    assert not parse_args(base, world_size=1).lora.enabled
    for kwargs, message in [
        ({"lora_r": 0}, "--lora-r must be > 0"),
        ({"lora_r": 4, "lora_alpha": 0}, "--lora-alpha must be > 0"),
        ({"lora_r": 4, "lora_target_modules": ["q_proj"]}, "--lora-target-modules q_proj"),
        ({"lora_load": "x"}, "--lora-load needs --lora-r"),
        ({"lora_ckpt_filter": True}, "--lora-ckpt-filter needs --lora-r"),
    ]:
        with pytest.raises(ConfigError, match=message):
            LoraConfig(**kwargs)
