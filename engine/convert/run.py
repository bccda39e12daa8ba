"""One entry point for the three conversion directions (what tools/checkpoint/convert_ckpt.py calls)."""

from __future__ import annotations

from engine.convert.common import ConvertConfig
from engine.convert.hf_to_mg import convert_hf_to_mg
from engine.convert.lora import write_peft_adapter
from engine.convert.mg_to_hf import convert_mg_to_hf
from engine.convert.reshard import reshard


def run_conversion(config: ConvertConfig) -> list[str]:
    """Runs the conversion; returns the pretrain_dpo.py flags for megatron output (empty for HF output)."""
    if config.save_lora_to_hf:
        write_peft_adapter(config)
        return []
    if config.save_model_type == "hf":
        convert_mg_to_hf(config)
        return []
    if config.load_model_type == "hf":
        return convert_hf_to_mg(config)
    return reshard(config)
