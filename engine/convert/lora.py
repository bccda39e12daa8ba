"""LoRA adapters in conversions: merge them into the base weights, or export them as a PEFT adapter.

Adapters come from a LoRA training checkpoint (`--lora-load`, adapter-only or full),
merged over TP like the weights they adapt (engine/checkpoint/sharding.py knows their
split dims: column-parallel B on dim 0, gated fc1 B as [gate; up], row-parallel A on
dim 1, the rest replicated). In megatron-core's layout `W' = W + (alpha / r) B A`
is one product per linear, since B's rows follow W's rows ([q|k|v] per query group
for linear_qkv, [gate; up] for linear_fc1).

The PEFT export maps one megatron adapter to several HF modules where megatron fuses
them: q/k/v (and gate/up) share the input, so they share A, and B's rows are split
exactly as the fused weight's rows are. A layer's routed experts are one HF module with
3D parameters, which PEFT adapts per expert through `target_parameters`: each expert's
adapters are stacked into that parameter's (see `_expert_parameters`); EP checkpoints
have been merged to global expert indices by then.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from engine.convert.common import ConversionError, ConvertConfig, staged_output
from engine.convert.hf_io import save_safetensors
from engine.convert.mapping import FINAL_NORM, OUTPUT, SCORE, unpack_qkv
from engine.convert.mg_io import MegatronCheckpoint, _model_chunks
from engine.checkpoint.sharding import merge_chunk
from engine.model.families import get_family
from engine.formats import VALUE_HEAD_KEY
from engine.model.lora import is_adapter_key, trained_with_adapters

log = logging.getLogger(__name__)

_ADAPTER = re.compile(r"^decoder\.layers\.(\d+)\.(self_attention|mlp|mlp\.experts\.local_experts\.\d+|"
                      r"mlp\.shared_experts)\.(linear_\w+)\.lora_([AB])\.weight$")
ADAPTER_FILE = "adapter_model.safetensors"


def read_adapters(root: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (TP-merged) adapter tensors of the latest iteration of `root`, by global layer (with a reward model's
    value head, trained beside them); and its args."""
    source = MegatronCheckpoint(root)
    layout = source.layout
    vp_stages = list(range(layout.virtual_pipeline_size)) if layout.virtual_pipeline_size else [None]
    adapters: dict[str, torch.Tensor] = {}
    for pp_rank in range(source.pp):
        # by (TP rank, EP rank), as merge_chunk takes them
        per_file = {(t, e): _model_chunks(source._load(t, pp_rank, e), source._path(t, pp_rank, e))
                    for t, e in source.files}
        for index, vp_stage in enumerate(vp_stages):
            ranks = {pair: {k: v for k, v in chunks[index].items() if trained_with_adapters(k)}
                     for pair, chunks in per_file.items()}
            adapters.update(merge_chunk(ranks, layout, pp_rank, vp_stage))
    if not adapters:
        raise ConversionError(f"--lora-load {root}: the checkpoint holds no LoRA adapter tensors")
    return adapters, source.args


def _check_settings(adapters: dict[str, torch.Tensor], args: dict[str, Any], config: ConvertConfig) -> None:
    found = {_ADAPTER.match(k).group(3) for k in adapters if _ADAPTER.match(k)}
    extra = sorted(found - set(config.lora_target_modules))
    if extra:
        raise ConversionError(f"--lora-load {config.lora_load} adapts {', '.join(extra)}, not in "
                              f"--lora-target-modules {' '.join(config.lora_target_modules)}")
    ranks = sorted({t.shape[0] for k, t in adapters.items() if k.endswith("lora_A.weight")})
    if ranks != [config.lora_r]:  # one rank everywhere: PEFT stacks a layer's experts at a single r
        raise ConversionError(f"--lora-r {config.lora_r}, but the adapters in {config.lora_load} have rank "
                              f"{', '.join(map(str, ranks))}")
    saved = ((args.get("engine") or {}).get("lora") or {}).get("lora_alpha")
    if saved is not None and float(saved) != float(config.lora_alpha):
        raise ConversionError(f"--lora-alpha {config.lora_alpha}, but {config.lora_load} was trained with {saved}")


def load_adapters(config: ConvertConfig) -> dict[str, torch.Tensor]:
    adapters, args = read_adapters(config.lora_load)
    _check_settings(adapters, args, config)
    return adapters


def merged_units(source: MegatronCheckpoint, config: ConvertConfig) -> Iterator[dict[str, torch.Tensor]]:
    """The base checkpoint's units with `--lora-load`'s adapters merged in (as is without --lora-load); a LoRA
    reward model's value head replaces the base's output layer."""
    if config.lora_load is None:
        yield from source.units()
        return
    adapters = load_adapters(config)
    scale = config.lora_alpha / config.lora_r
    used = 0
    for unit in source.units():
        merged = {}
        for key, tensor in unit.items():
            if is_adapter_key(key):
                continue  # a full LoRA checkpoint as the base: --lora-load's adapters are the ones merged
            prefix = key.removesuffix(".weight")
            a = adapters.get(f"{prefix}.lora_A.weight")
            if a is not None and key.endswith(".weight"):
                b = adapters[f"{prefix}.lora_B.weight"]
                tensor = (tensor.float() + scale * (b.float() @ a.float())).to(tensor.dtype)
                used += 1
            merged[key] = tensor
        if FINAL_NORM in merged and VALUE_HEAD_KEY in adapters:
            merged.pop(OUTPUT, None)
            merged[VALUE_HEAD_KEY] = adapters[VALUE_HEAD_KEY]
        yield merged
    expected = sum(1 for k in adapters if k.endswith("lora_A.weight"))
    if used != expected:
        raise ConversionError(f"merged {used} of {expected} adapters: --lora-load {config.lora_load} does not "
                              f"match the layers of --load-dir {config.load_dir}")


# A routed expert's megatron linear -> the parameter of HF's experts module that holds it for every expert.
EXPERT_PARAMETERS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}


def _hf_modules(names, layer: int, owner: str, linear: str, a: torch.Tensor, b: torch.Tensor,
                args: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module path -> (A, B) for one megatron adapter of attention, a dense MLP or the shared expert (whose
    projections are nn.Linear modules in HF too)."""
    path = lambda name: names.layer(layer, name.removesuffix(".weight"))  # noqa: E731
    if linear == "linear_qkv":
        q, k, v = unpack_qkv(b, args["num_attention_heads"], args["num_query_groups"], args["kv_channels"])
        return {path(names.q): (a, q), path(names.k): (a, k), path(names.v): (a, v)}
    if owner == "mlp.shared_experts":
        gate, up, down = (names.shared_expert + name for name in ("gate_proj", "up_proj", "down_proj"))
    else:
        gate, up, down = names.gate, names.up, names.down
    if linear == "linear_fc1":
        gate_b, up_b = b.chunk(2, dim=0)
        return {path(gate): (a, gate_b), path(up): (a, up_b)}
    return {path({"linear_proj": names.o, "linear_fc2": down}[linear]): (a, b)}


def _expert_parameters(names, layer: int, adapted: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]],
                       num_experts: int) -> dict[str, torch.Tensor]:
    """PEFT's tensors for one layer's routed experts (`adapted`: linear -> expert -> (A, B)).

    PEFT's ParamWrapper adapts a 3D parameter with one rank-r adapter per expert: lora_A [experts x r, in]
    read as (experts, r, in), lora_B [out, r x experts] read as (out, r, experts), so expert e's A is rows
    e r .. e r + r - 1 and its B is columns e, experts + e, ... . Megatron's fused fc1 adapter (one A, B over
    [gate; up] rows) is exactly gate_up_proj's, whose rows are [gate; up] too. With both parameters adapted
    PEFT nests its wrappers in the module's parameter order, so gate_up_proj's is the inner (`base_layer`).
    """
    module = names.layer(layer, names.experts)
    tensors = {}
    for linear, experts in adapted.items():
        if sorted(experts) != list(range(num_experts)):
            raise ConversionError(f"--save-lora-to-hf: layer {layer}'s {linear} has adapters for experts "
                                  f"{sorted(experts)} of {num_experts}; PEFT adapts all of a layer's experts")
        nested = ".base_layer" if linear == "linear_fc1" and len(adapted) == 2 else ""
        tensors[f"{module}{nested}.lora_A.weight"] = torch.cat([experts[e][0] for e in range(num_experts)])
        tensors[f"{module}{nested}.lora_B.weight"] = torch.stack(
            [experts[e][1] for e in range(num_experts)], dim=-1).flatten(1)
    return tensors


def peft_adapter(adapters: dict[str, torch.Tensor], args: dict[str, Any], family_name: str, r: int, alpha: float,
                 dropout: float = 0.0, base_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(adapter_model tensors, adapter_config) of full megatron adapters (`read_adapters`) under HF names:
    ordinary modules through `target_modules`, routed experts through `target_parameters` (PEFT >= 0.19.1,
    the first to read transformers 5's [experts, out, in] expert layout)."""
    names = get_family(family_name).names
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    routed: dict[int, dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for key in sorted(adapters):
        match = _ADAPTER.match(key)
        if match is None or match.group(4) != "A":
            continue
        layer, owner, linear = int(match.group(1)), match.group(2), match.group(3)
        a, b = adapters[key], adapters[key.replace("lora_A", "lora_B")]
        if owner.startswith("mlp.experts.local_experts."):
            expert = int(owner.rsplit(".", 1)[1])
            routed.setdefault(layer, {}).setdefault(linear, {})[expert] = (a, b)
            continue
        for module, (a_part, b_part) in _hf_modules(names, layer, owner, linear, a, b, args).items():
            tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = a_part, b_part
            targets.add(module.rsplit(".", 1)[-1])
    parameters = {f"{names.experts}.{EXPERT_PARAMETERS[linear]}" for adapted in routed.values() for linear in adapted}
    for layer, adapted in routed.items():
        tensors.update(_expert_parameters(names, layer, adapted, args["num_experts"]))
    if parameters and dropout:
        # PEFT refuses dropout on a wrapped parameter (it cannot apply it to the input alone); the adapters'
        # weights are exact, and dropout only ever acted in training.
        log.info("--save-lora-to-hf: lora_dropout %g written as 0 (PEFT has no dropout on expert parameters)",
                 dropout)
        dropout = 0.0
    tensors = {f"base_model.model.{key}": tensor.contiguous().clone() for key, tensor in tensors.items()}
    head = adapters.get(VALUE_HEAD_KEY)
    if head is not None:  # a reward model: the classifier's score is saved whole beside the adapters
        tensors[f"base_model.model.{SCORE}"] = head.contiguous().clone()
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if head is None else "SEQ_CLS", "r": r, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_name,
        "modules_to_save": None if head is None else [SCORE.removesuffix(".weight")],
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    if parameters:
        adapter_config["target_parameters"] = sorted(parameters)
    return tensors, adapter_config


def write_peft_adapter(config: ConvertConfig) -> Path:
    """--save-lora-to-hf: adapter_config.json + adapter_model.safetensors under HF module names."""
    adapters, args = read_adapters(config.lora_load)
    _check_settings(adapters, args, config)
    base = MegatronCheckpoint(config.load_dir, config.load_iteration).args
    family_name = config.model_type_hf or base.get("family") or args.get("family")
    if family_name is None:
        raise ConversionError(f"{config.load_dir}: args record no model family; pass --model-type-hf")
    dropout = ((args.get("engine") or {}).get("lora") or {}).get("lora_dropout", 0.0)
    tensors, adapter_config = peft_adapter(adapters, args, family_name, config.lora_r, config.lora_alpha,
                                           dropout, (base.get("hf_config") or {}).get("_name_or_path") or None)
    if config.dtype:
        tensors = {key: tensor.to(config.dtype) for key, tensor in tensors.items()}
    with staged_output(config.save_dir) as staging:
        save_safetensors(tensors, staging / ADAPTER_FILE)
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    log.info("wrote a PEFT LoRA adapter (r %d, alpha %g, %s) for %s -> %s", config.lora_r, config.lora_alpha,
             ", ".join(adapter_config["target_modules"] + adapter_config.get("target_parameters", [])), family_name,
             config.save_dir)
    if "target_parameters" in adapter_config:
        log.info("the routed experts' adapters use PEFT's target_parameters: load them with peft >= 0.19.1")
    return Path(config.save_dir)
