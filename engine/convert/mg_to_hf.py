"""Megatron-LM checkpoint -> a complete HF folder that loads in transformers on its own.

Memory: rank files are memory-mapped and merged over TP one layer at a time; HF tensors
are buffered into one safetensors shard at a time (--max-shard-size). The converter holds
about one layer plus one output shard; resident memory also counts the pages of the
current stage's mapped rank files (clean, file-backed, reclaimable).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.convert.common import DTYPE_NAMES, ConvertConfig, ConversionError, staged_output
from engine.convert.hf_io import HFShardWriter, copy_tokenizer
from engine.convert.mapping import mcore_to_hf_unit
from engine.convert.lora import merged_units
from engine.convert.mg_io import MegatronCheckpoint
from engine.model.lora import is_adapter_key
from engine.model.families import UnsupportedModelError, get_family, hf_config_kwargs

log = logging.getLogger(__name__)

_KEPT_HF_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
"""Fields of the original config.json that describe no architecture but that users rely on."""


def write_hf_config(path: Path, family_name: str, args: dict[str, Any], dtype: torch.dtype) -> Any:
    """config.json through the family's transformers config class; returns the config."""
    import transformers

    family = get_family(family_name)
    kwargs = hf_config_kwargs(family, args)
    stored = args.get("hf_config") or {}
    kwargs.update({k: stored[k] for k in _KEPT_HF_FIELDS if k in stored})
    kwargs["dtype"] = str(dtype).removeprefix("torch.")
    config = getattr(transformers, family.config_class)(**kwargs)
    config.save_pretrained(path)
    return config


def _write_tokenizer(path: Path, source: str | None, from_flag: bool, config: Any) -> None:
    """Tokenizer files and generation_config.json (the source folder's, else one from the config)."""
    from transformers import GenerationConfig

    if source is not None and not Path(source).exists():
        if from_flag:
            raise ConversionError(f"--tokenizer-model {source} does not exist")
        log.warning("recorded tokenizer %s no longer exists; pass --tokenizer-model", source)
        source = None
    copied = copy_tokenizer(source, path) if source else []
    if source is None or not copied:
        log.warning("no tokenizer files copied; the output folder needs a tokenizer before use")
    generation = Path(source) / "generation_config.json" if source else None
    if generation is not None and generation.is_file():
        shutil.copy2(generation, path / generation.name)
    else:
        GenerationConfig.from_model_config(config).save_pretrained(path)


def convert_mg_to_hf(config: ConvertConfig) -> Path:
    mg = MegatronCheckpoint(config.load_dir, config.load_iteration)
    args = mg.args
    family = config.model_type_hf or args.get("family")
    if family is None:
        raise ConversionError(f"{config.load_dir}: args record no model family; pass --model-type-hf")
    try:
        entry = get_family(family)
    except UnsupportedModelError as err:
        raise ConversionError(str(err)) from None
    dtype = config.dtype
    with staged_output(config.save_dir) as staging:
        writer = HFShardWriter(staging, config.max_shard_size)
        for unit in merged_units(mg, config):
            if any(is_adapter_key(k) for k in unit):
                raise ConversionError(f"{config.load_dir} holds LoRA adapters: merge them with --lora-load "
                                      f"{config.load_dir} --lora-r R --lora-alpha A")
            hf_unit = mcore_to_hf_unit(unit, entry, args)
            if dtype is not None:
                hf_unit = {k: v.to(dtype) for k, v in hf_unit.items()}
            dtype = dtype or next(iter(hf_unit.values())).dtype
            writer.add(hf_unit)
        writer.close()
        hf_config = write_hf_config(staging, family, args, dtype)
        tokenizer = config.tokenizer_model or args.get("tokenizer")
        _write_tokenizer(staging, tokenizer, config.tokenizer_model is not None, hf_config)
    log.info("converted %s (iteration %d, TP%d PP%d, %s, %s) -> %s", config.load_dir, mg.iteration, mg.tp, mg.pp,
             family, DTYPE_NAMES.get(dtype, dtype), config.save_dir)
    return Path(config.save_dir)
