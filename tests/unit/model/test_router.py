"""The engine's MoE router (engine.model.compat.MEGATRON_CORE_CORRECTIONS): its z-loss is the mean over the
sequence's real tokens under sequence parallelism too, and megatron-core's load-balancing losses already agree.

One micro-batch (two rows of 8 tokens, the first with 3 real tokens: its padding sits in the second half, the
last TP rank's share) goes through one router at TP1 and, split along the sequence, at TP2 + sequence parallel.
The logged losses (the tracker's values summed over their reduce group), the router weight's gradient (summed
over TP, as megatron does for sequence-parallel weights) and the input's gradient must agree; the one-rank z-loss
is also recomputed by hand. megatron-core's own router under the same split gives another z-loss: the bug.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from tests.distributed.harness import run_ranks

HIDDEN, EXPERTS, SEQ, ROWS, REAL = 16, 4, 8, 2, (3, 8)
Z_COEFF, AUX_COEFF = 1e-3, 1e-2


CASES = (("aux_loss", False), ("seq_aux_loss", False), ("none", False), ("none", True))
"""(load-balancing type, calculate_per_token_loss); "none": the z-loss alone."""


def _router_losses() -> dict:
    """This rank's share of the micro-batch through each router; TP is the world size (1 or 2)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.moe.router import TopKRouter

    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed
    from engine.model.router import SequenceZLossRouter

    tp = int(os.environ["WORLD_SIZE"])
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1))
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(EXPERTS, HIDDEN, generator=generator)
    hidden = torch.randn(SEQ, ROWS, HIDDEN, generator=generator) * 2
    padding = torch.arange(SEQ)[:, None] >= torch.tensor(REAL)[None, :]  # [s, b], True on padding
    share = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    results = {}
    for kind, per_token in CASES:
        for name, cls in (("engine", SequenceZLossRouter), ("megatron", TopKRouter)):
            config = TransformerConfig(
                num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS, moe_router_topk=2,
                moe_router_load_balancing_type=kind, moe_aux_loss_coeff=0.0 if kind == "none" else AUX_COEFF,
                moe_z_loss_coeff=Z_COEFF,
                tensor_model_parallel_size=tp, sequence_parallel=tp > 1, add_bias_linear=False,
                use_cpu_initialization=True, calculate_per_token_loss=per_token)
            router = cls(config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
            router.set_layer_number(1)
            with torch.no_grad():
                router.weight.copy_(weight)
            local = hidden[share].clone().requires_grad_()
            probs, _ = router(local, padding_mask=padding[share])
            (probs.sum() * 0).backward()  # only the attached router losses give gradients
            grad = router.weight.grad.clone()
            torch.distributed.all_reduce(grad, group=group)
            inputs = [torch.empty_like(local.grad) for _ in range(tp)]
            torch.distributed.all_gather(inputs, local.grad.contiguous(), group=group)
            logged = {}
            for loss, entry in get_moe_layer_wise_logging_tracker().items():
                values = entry["values"].clone()
                if entry.get("reduce_group") is not None:
                    torch.distributed.all_reduce(values, group=entry["reduce_group"])
                if values.any():  # the tracker keeps the names it cleared, with zeros
                    logged[loss] = values.sum().item()
            clear_aux_losses_tracker()
            results[kind, per_token, name] = {"logged": logged, "weight_grad": grad, "input_grad": torch.cat(inputs)}
    valid = ~padding.flatten()
    squares = torch.logsumexp(hidden.flatten(0, 1) @ weight.t(), dim=-1).square()
    results["expected_z_loss"] = squares[valid].mean().item()
    return results


@pytest.fixture(scope="module")
def runs() -> dict:
    return {"tp1": run_ranks(_router_losses, 1)[0], "tp2": run_ranks(_router_losses, 2)[0]}


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss", "none"])
def test_router_losses_and_gradients_agree_under_sequence_parallelism(runs, kind):
    one, two = runs["tp1"][kind, False, "engine"], runs["tp2"][kind, False, "engine"]
    assert one["logged"]["z_loss"] == pytest.approx(runs["tp1"]["expected_z_loss"], rel=1e-6)
    lb = {"aux_loss": {"load_balancing_loss"}, "seq_aux_loss": {"seq_load_balancing_loss"}, "none": set()}[kind]
    assert set(two["logged"]) == set(one["logged"]) == {"z_loss", *lb}
    for loss, value in one["logged"].items():
        assert two["logged"][loss] == pytest.approx(value, rel=1e-6), loss
    torch.testing.assert_close(two["weight_grad"], one["weight_grad"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(two["input_grad"], one["input_grad"], rtol=1e-5, atol=1e-8)
    # At one rank the engine's router is megatron's; under the split megatron's z-loss is a mean of the ranks' means.
    stock_one, stock_two = runs["tp1"][kind, False, "megatron"], runs["tp2"][kind, False, "megatron"]
    torch.testing.assert_close(stock_one["weight_grad"], one["weight_grad"], rtol=1e-6, atol=0)
    assert abs(stock_two["logged"]["z_loss"] / 2 - one["logged"]["z_loss"]) > 1e-2 * one["logged"]["z_loss"]
    assert not torch.allclose(stock_two["weight_grad"], one["weight_grad"], rtol=1e-3, atol=0)


def test_per_token_scaling_attaches_the_sum_over_the_micro_batch(runs):
    """Under calculate_per_token_loss megatron divides gradients by the global token count: the group's attached
    z-loss is then coeff x the sum over the micro-batch's real tokens, so its gradient is the mean's times their
    count, at one rank and at TP2 alike."""
    for run in runs.values():
        mean, summed = run["none", False, "engine"], run["none", True, "engine"]
        assert summed["logged"] == pytest.approx(mean["logged"], rel=1e-6)
        for grad in ("weight_grad", "input_grad"):
            torch.testing.assert_close(summed[grad], mean[grad] * sum(REAL), rtol=1e-5, atol=1e-8)


# -- where the engine's router enters the model --------------------------------------------------------------------


def test_each_listed_correction_names_a_subclass_that_overrides_the_method():
    from engine.model import compat

    for entry in compat.MEGATRON_CORE_CORRECTIONS:
        original, arrow, replacement = entry.split()[:3]
        assert arrow == "->", entry
        module, cls, method = original.rsplit(".", 2)
        base = getattr(importlib.import_module(module), cls)
        module, cls = replacement.rsplit(".", 1)
        fix = getattr(importlib.import_module(module), cls)
        assert issubclass(fix, base) and method in vars(fix) and getattr(base, method) is not getattr(fix, method)


def _block_routers() -> dict:
    """The routers of megatron-core's own decoder block (the TE path's function, here without TE) for a model whose
    layers 0 and 2 are dense (--moe-layer-freq), before and after `with_engine_router` (megatron reads the pipeline
    layout from parallel state, hence a rank)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed
    from engine.model.spec import moe_spec, with_engine_router

    initialize_distributed(ParallelConfig())
    config = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=4, num_moe_experts=4,
                               moe_ffn_hidden_size=16, moe_layer_freq=[0, 1, 0, 1], use_cpu_initialization=True)
    megatrons = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=None)
    ours = with_engine_router(megatrons)

    def routers(block):
        return [layer.submodules.mlp.submodules.router.__name__
                if isinstance(layer.submodules.mlp.submodules, MoESubmodules) else None for layer in block.layer_specs]

    return {"megatron": routers(megatrons), "ours": routers(ours), "local": moe_spec().submodules.router.__name__,
            "dense_kept": ours.layer_specs[0] is megatrons.layer_specs[0]}


def test_local_and_te_moe_layers_build_the_engine_router():
    """The local spec names it; megatron-core's decoder block gets it in every MoE layer, its dense layers and
    the original spec untouched."""
    facts = run_ranks(_block_routers, 1)[0]
    assert facts["local"] == "SequenceZLossRouter"
    assert facts["megatron"] == [None, "TopKRouter", None, "TopKRouter"]
    assert facts["ours"] == [None, "SequenceZLossRouter", None, "SequenceZLossRouter"] and facts["dense_kept"]


def test_api_problems_name_a_router_without_the_z_loss_hook(monkeypatch):
    from megatron.core.transformer.moe.router import TopKRouter

    from engine.model import compat

    monkeypatch.setattr(TopKRouter, "apply_z_loss", lambda self, logits: logits)  # 0.15's signature
    assert compat.api_problems() == [
        "TopKRouter.apply_z_loss(logits, padding_mask) is missing: the engine's router overrides it"]
