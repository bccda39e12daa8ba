"""LoRA adapters in conversions: merge them into the base weights, or export them as a PEFT adapter.

Adapters come from a LoRA training checkpoint (`--lora-load`, adapter-only or full),
merged over TP like the weights they adapt (engine/checkpoint/sharding.py knows their
split dims: column-parallel B on dim 0, gated fc1 B as [gate; up], row-parallel A on
dim 1, the rest replicated). In megatron-core's layout `W' = W + (alpha / r) B A`
is one product per linear, since B's rows follow W's rows ([q|k|v] per query group
for linear_qkv, [gate; up] for linear_fc1).

The PEFT export maps one megatron adapter to several HF modules where megatron fuses
them: q/k/v (and gate/up) share the input, so they share A, and B's rows are split
exactly as the fused weight's rows are.
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
        # EP rank 0's TP files, then EP rank 1's, ... (as merge_chunk takes them)
        per_tp = [_model_chunks(source._load(t, pp_rank, e), source._path(t, pp_rank, e))
                  for e in range(source.ep) for t in range(source.tp)]
        for index, vp_stage in enumerate(vp_stages):
            ranks = [{k: v for k, v in chunks[index].items() if trained_with_adapters(k)} for chunks in per_tp]
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
    rank = next(t.shape[0] for k, t in adapters.items() if k.endswith("lora_A.weight"))
    if rank != config.lora_r:
        raise ConversionError(f"--lora-r {config.lora_r}, but the adapters in {config.lora_load} have rank {rank}")
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


def _hf_modules(family_names, layer: int, linear: str, a: torch.Tensor, b: torch.Tensor,
                args: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF module path -> (A, B) for one megatron adapter."""
    path = lambda name: family_names.layer(layer, name.removesuffix(".weight"))  # noqa: E731
    if linear == "linear_qkv":
        q, k, v = unpack_qkv(b, args["num_attention_heads"], args["num_query_groups"], args["kv_channels"])
        return {path(family_names.q): (a, q), path(family_names.k): (a, k), path(family_names.v): (a, v)}
    if linear == "linear_fc1":
        gate, up = b.chunk(2, dim=0)
        return {path(family_names.gate): (a, gate), path(family_names.up): (a, up)}
    name = {"linear_proj": family_names.o, "linear_fc2": family_names.down}[linear]
    return {path(name): (a, b)}


def write_peft_adapter(config: ConvertConfig) -> Path:
    """--save-lora-to-hf: adapter_config.json + adapter_model.safetensors under HF module names."""
    adapters, args = read_adapters(config.lora_load)
    _check_settings(adapters, args, config)
    base = MegatronCheckpoint(config.load_dir, config.load_iteration).args
    family_name = config.model_type_hf or base.get("family") or args.get("family")
    if family_name is None:
        raise ConversionError(f"{config.load_dir}: args record no model family; pass --model-type-hf")
    names = get_family(family_name).names
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for key in sorted(adapters):
        match = _ADAPTER.match(key)
        if match is None or match.group(4) != "A":
            continue
        layer, linear = int(match.group(1)), match.group(3)
        if match.group(2) != "self_attention" and match.group(2) != "mlp":
            raise ConversionError(
                f"--save-lora-to-hf: {key} adapts an expert; transformers 5 holds a layer's experts as one 3D "
                "tensor (PEFT modules cannot address one expert), so export attention-only adapters "
                "(--lora-target-modules linear_qkv linear_proj) or merge the adapters into the weights (drop "
                "--save-lora-to-hf)")
        b = adapters[key.replace("lora_A", "lora_B")]
        for module, (a_part, b_part) in _hf_modules(names, layer, linear, adapters[key], b, args).items():
            for part, tensor in (("lora_A", a_part), ("lora_B", b_part)):
                tensor = tensor.to(config.dtype) if config.dtype else tensor
                tensors[f"base_model.model.{module}.{part}.weight"] = tensor.contiguous().clone()
            targets.add(module.rsplit(".", 1)[-1])
    head = adapters.get(VALUE_HEAD_KEY)
    if head is not None:  # a reward model: the classifier's score is saved whole beside the adapters
        tensors[f"base_model.model.{SCORE}"] = (head.to(config.dtype) if config.dtype else head).contiguous().clone()
    hf_config = base.get("hf_config") or {}
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if head is None else "SEQ_CLS", "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": ((args.get("engine") or {}).get("lora") or {}).get("lora_dropout", 0.0),
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": hf_config.get("_name_or_path") or None,
        "modules_to_save": None if head is None else [SCORE.removesuffix(".weight")],
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    with staged_output(config.save_dir) as staging:
        save_safetensors(tensors, staging / ADAPTER_FILE)
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    log.info("wrote a PEFT LoRA adapter (r %d, alpha %g, %s) for %s -> %s", config.lora_r, config.lora_alpha,
             ", ".join(sorted(targets)), family_name, config.save_dir)
    return Path(config.save_dir)

