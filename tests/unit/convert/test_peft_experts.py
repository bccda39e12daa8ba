"""The PEFT export of adapters on MoE experts (`peft_adapter`) against the adapters merged by hand.

Megatron-named adapters on every routed expert (and the shared expert, o_proj) of each MoE family's tiny HF
model are exported, loaded with `PeftModel.from_pretrained`, and must give the logits of the checkpoint whose
per-expert tensors (the names transformers saves, one per expert projection) had `(alpha / r) B A` added: the
stacked per-expert layout, the [gate; up] order of gate_up_proj and the nesting of two wrapped parameters
all move the logits if wrong.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.convert.common import ConversionError
from engine.convert.hf_io import save_safetensors
from engine.convert.lora import ADAPTER_FILE, peft_adapter
from engine.model.families import get_family, model_args
from tests.e2e.convert_assets import build_tiny_moe

R, ALPHA = 2, 6.0
TOKENS = torch.tensor([[1, 17, 42, 99, 5, 63, 150, 7, 88, 2]])


def _random_adapters(args: dict, targets: tuple[str, ...], shared: bool) -> dict[str, torch.Tensor]:
    """Megatron-named adapters with a non-zero B, as a run's checkpoint holds them after training."""
    hidden = args["hidden_size"]
    owners = {f"mlp.experts.local_experts.{e}": args["moe_ffn_hidden_size"] for e in range(args["num_experts"])}
    if shared:
        owners["mlp.shared_experts"] = args["moe_shared_expert_intermediate_size"]
    fans = {"linear_fc1": lambda ffn: (hidden, 2 * ffn), "linear_fc2": lambda ffn: (ffn, hidden)}
    units = [(owner, linear, fans[linear](ffn)) for owner, ffn in owners.items() for linear in targets
             if linear in fans]
    if "linear_proj" in targets:
        units.append(("self_attention", "linear_proj", (args["num_attention_heads"] * args["kv_channels"], hidden)))
    adapters = {}
    for layer in range(args["num_layers"]):
        for owner, linear, (fan_in, fan_out) in units:
            prefix = f"decoder.layers.{layer}.{owner}.{linear}"
            adapters[f"{prefix}.lora_A.weight"] = 0.3 * torch.randn(R, fan_in)
            adapters[f"{prefix}.lora_B.weight"] = 0.3 * torch.randn(fan_out, R)
    return adapters


def _merge_by_hand(source, target, family: str, adapters: dict[str, torch.Tensor]) -> None:
    """The HF checkpoint with each adapter added to the per-expert tensor(s) it adapts."""
    names = get_family(family).names
    tensors = load_file(source / "model.safetensors")
    scale = ALPHA / R

    def add(name: str, delta: torch.Tensor) -> None:
        tensors[name] = tensors[name] + delta  # KeyError: the test's names are not the checkpoint's

    for key, a in adapters.items():
        if not key.endswith("lora_A.weight"):
            continue
        delta = scale * adapters[key.replace("lora_A", "lora_B")] @ a
        _, _, layer, rest = key.split(".", 3)
        layer_name = lambda name: names.layer(int(layer), name)  # noqa: E731
        owner, linear = rest.removesuffix(".lora_A.weight").rsplit(".", 1)
        if linear == "linear_proj":
            add(layer_name(names.o), delta)
            continue
        if owner == "mlp.shared_experts":
            gate, up, down = (names.shared_expert + p + ".weight" for p in ("gate_proj", "up_proj", "down_proj"))
        else:
            prefix = names.expert.format(int(owner.rsplit(".", 1)[1]))
            gate, up, down = prefix + names.expert_gate, prefix + names.expert_up, prefix + names.expert_down
        if linear == "linear_fc1":  # megatron's fc1 rows are [gate; up]
            gate_delta, up_delta = delta.chunk(2)
            add(layer_name(gate), gate_delta)
            add(layer_name(up), up_delta)
        else:
            add(layer_name(down), delta)
    shutil.copytree(source, target)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS).logits


CASES = [
    ("qwen2_moe", ("linear_proj", "linear_fc1", "linear_fc2")),  # routed + shared expert, two nested wrappers
    ("qwen3_moe", ("linear_proj", "linear_fc1", "linear_fc2")),
    ("mixtral", ("linear_proj", "linear_fc1", "linear_fc2")),  # block_sparse_moe.experts.E.w1/w3/w2 on disk
    ("qwen3_moe", ("linear_fc1",)),  # one wrapped parameter: no nesting
    ("mixtral", ("linear_fc2",)),
]


@pytest.mark.parametrize("family,targets", CASES, ids=[f"{f}-{'+'.join(t)}" for f, t in CASES])
def test_peft_export_of_expert_adapters_equals_the_merged_experts(family, targets, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    hf = build_tiny_moe(family, tmp_path / "hf", seed=3)
    args = model_args(get_family(family), json.loads((hf / "config.json").read_text()))
    torch.manual_seed(4)
    adapters = _random_adapters(args, targets, shared=get_family(family).shared_expert)
    tensors, config = peft_adapter(adapters, args, family, R, ALPHA, dropout=0.1)
    assert config["target_parameters"] == sorted(
        {"linear_fc1": "mlp.experts.gate_up_proj", "linear_fc2": "mlp.experts.down_proj"}[t]
        for t in targets if t != "linear_proj")
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on wrapped parameters
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_safetensors(tensors, adapter / ADAPTER_FILE)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _merge_by_hand(hf, tmp_path / "merged", family, adapters)

    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # noqa: E731
    base = _logits(load(hf))
    expected = _logits(load(tmp_path / "merged"))
    model = PeftModel.from_pretrained(load(hf), adapter)
    # Every exported tensor is one PEFT placed, under the name it saves.
    assert sorted(get_peft_model_state_dict(model)) == sorted(tensors)
    got = _logits(model)
    assert (expected - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_an_expert_without_adapters_is_refused(tmp_path):
    """PEFT stacks all of a layer's experts in one adapter: a checkpoint missing one cannot be exported."""
    hf = build_tiny_moe("qwen3_moe", tmp_path / "hf", seed=3)
    args = model_args(get_family("qwen3_moe"), json.loads((hf / "config.json").read_text()))
    adapters = _random_adapters(args, ("linear_fc2",), shared=False)
    for part in ("A", "B"):
        del adapters[f"decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.lora_{part}.weight"]
    with pytest.raises(ConversionError, match=r"layer 1's linear_fc2 has adapters for experts \[0, 1, 3\] of 4"):
        peft_adapter(adapters, args, "qwen3_moe", R, ALPHA)
