"""Megatron-LM checkpoint -> the same weights under another TP/PP layout (iteration 1, weights only).

Weight names stay the source's (local or TE spelling) unless --transformer-impl asks for the other.

Streams units from the source (TP merged per layer from memory-mapped files) into the
target writer, so memory follows one target pipeline stage, as in hf -> mg.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.convert.common import ConvertConfig, staged_output
from engine.convert.hf_to_mg import layout_flags, target_layout
from engine.convert.lora import merged_units
from engine.convert.mg_io import MegatronCheckpoint, MegatronWriter
from engine.model.spelling import to_spelling

log = logging.getLogger(__name__)


def reshard(config: ConvertConfig) -> list[str]:
    """Reshards and returns the pretrain_dpo.py flags for the new layout."""
    source = MegatronCheckpoint(config.load_dir, config.load_iteration)
    args = dict(source.args)
    layout = target_layout(args, config)
    if config.params_dtype:
        args["params_dtype"] = config.params_dtype
    for key in ("lora_adapter_only", "lora_base"):  # merged output is a plain checkpoint
        if config.lora_load is not None:
            args.pop(key, None)
    if config.tokenizer_model:
        args["tokenizer"] = str(Path(config.tokenizer_model).resolve())
    with staged_output(config.save_dir) as staging:
        writer = MegatronWriter(staging, layout, args, config.dtype)
        for unit in merged_units(source, config):
            if config.transformer_impl is not None:
                unit = to_spelling(unit, te=config.transformer_impl == "transformer_engine")
            writer.add(unit)
        writer.close()
    flags = layout_flags(args)
    log.info("resharded %s (TP%d PP%d) -> %s (TP%d PP%d, %s)", config.load_dir, source.tp, source.pp,
             config.save_dir, layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
             args.get("params_dtype"))
    return flags
