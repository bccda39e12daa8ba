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
from engine.convert.mapping import SCORE, classifier_architecture, mcore_to_hf_unit
from engine.convert.lora import merged_units
from engine.convert.mg_io import MegatronCheckpoint
from engine.model.lora import is_adapter_key
from engine.model.families import UnsupportedModelError, get_family, hf_config_kwargs

log = logging.getLogger(__name__)

_KEPT_HF_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
"""Fields of the original config.json that describe no architecture but that users rely on."""


def write_hf_config(path: Path, family_name: str, args: dict[str, Any], dtype: torch.dtype,
                    reward_model: bool = False) -> Any:
    """config.json through the family's transformers config class; returns the config. A reward model is the
    family's `*ForSequenceClassification` with one label."""
    import transformers

    family = get_family(family_name)
    kwargs = hf_config_kwargs(family, args)
    stored = args.get("hf_config") or {}
    kwargs.update({k: stored[k] for k in _KEPT_HF_FIELDS if k in stored})
    if reward_model:
        kwargs.update(architectures=[classifier_architecture(family)], num_labels=1)
        kwargs["pad_token_id"] = _classifier_pad_id(kwargs.get("pad_token_id"), args.get("tokenizer"),
                                                    kwargs.get("eos_token_id"))
    kwargs["dtype"] = str(dtype).removeprefix("torch.")
    config = getattr(transformers, family.config_class)(**kwargs)
    config.save_pretrained(path)
    return config


def _classifier_pad_id(pad_id: int | None, tokenizer: str | None, eos_id) -> int | None:
    """The pad id a sequence classifier's config needs: transformers reads each row's score at its last token
    that is not `pad_token_id` (and refuses batches without one). The source config's, else the tokenizer's."""
    if pad_id is None and tokenizer is not None and Path(tokenizer).is_dir():
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(tokenizer).pad_token_id
    if pad_id is None:
        log.warning("no pad_token_id (neither the model's config nor the tokenizer has one): transformers will score "
                    "batches of one sequence only; set pad_token_id in config.json to an id that never ends a sequence")
    elif pad_id == eos_id or (isinstance(eos_id, list) and pad_id in eos_id):
        log.warning("pad_token_id %d is also the EOS token: transformers reads the reward at the last token that is "
                    "not %d, before a trailing EOS, where the engine trained it on the sequence's last token; set a "
                    "distinct pad_token_id in config.json", pad_id, pad_id)
    return pad_id


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
    reward_model = False
    with staged_output(config.save_dir) as staging:
        writer = HFShardWriter(staging, config.max_shard_size)
        for unit in merged_units(mg, config):
            if any(is_adapter_key(k) for k in unit):
                raise ConversionError(f"{config.load_dir} holds LoRA adapters: merge them with --lora-load "
                                      f"{config.load_dir} --lora-r R --lora-alpha A")
            hf_unit = mcore_to_hf_unit(unit, entry, args)
            reward_model = reward_model or SCORE in hf_unit
            if dtype is not None:
                hf_unit = {k: v.to(dtype) for k, v in hf_unit.items()}
            dtype = dtype or next(iter(hf_unit.values())).dtype
            writer.add(hf_unit)
        writer.close()
        hf_config = write_hf_config(staging, family, args, dtype, reward_model)
        tokenizer = config.tokenizer_model or args.get("tokenizer")
        _write_tokenizer(staging, tokenizer, config.tokenizer_model is not None, hf_config)
    log.info("converted %s (iteration %d, TP%d PP%d, %s%s, %s) -> %s", config.load_dir, mg.iteration, mg.tp, mg.pp,
             family, " reward model" if reward_model else "", DTYPE_NAMES.get(dtype, dtype), config.save_dir)
    return Path(config.save_dir)
