"""What every conversion direction shares: its config, its error type, and all-or-nothing output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from engine.arguments import LORA_TARGETS
from engine.checkpoint.layout import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the path or flag at fault."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1000000' -> bytes (decimal units, as HF's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for suffix, scale in units.items():
        if upper.endswith(suffix) and upper[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(suffix)]) * scale)
    _check(upper.isdigit(), f"--max-shard-size {text!r}: expected bytes or a size like 5GB")
    return int(upper)


@dataclass
class ConvertConfig:
    """One conversion: hf -> mg, mg -> hf, or mg -> mg (reshard)."""

    load_model_type: str
    """--load-model-type: hf or mg."""
    save_model_type: str
    """--save-model-type: hf or mg."""
    load_dir: str
    """--load-dir: HF folder or Megatron checkpoint root."""
    save_dir: str
    """--save-dir: created by the conversion; must not exist or be empty."""
    target_tensor_parallel_size: int = 1
    """--target-tensor-parallel-size (mg output)."""
    target_pipeline_parallel_size: int = 1
    """--target-pipeline-parallel-size (mg output)."""
    num_layer_list: tuple[int, ...] | None = None
    """--num-layer-list: layers per pipeline stage (uneven PP); default an even split."""
    model_type_hf: str | None = None
    """--model-type-hf: family; default detected from config.json (hf input) or the checkpoint args."""
    params_dtype: str | None = None
    """--params-dtype fp32/bf16/fp16: cast the weights; default keep the stored dtype."""
    add_qkv_bias: bool = False
    """--add-qkv-bias: accepted for MindSpeed-LLM scripts; must agree with the family."""
    tokenizer_model: str | None = None
    """--tokenizer-model: tokenizer folder or file to record (hf -> mg) or copy (mg -> hf)."""
    load_iteration: int | None = None
    """--load-iteration: mg input iteration; default the tracker's."""
    make_vocab_size_divisible_by: int = 128
    """--make-vocab-size-divisible-by: padded vocab is a multiple of this x target TP."""
    padded_vocab_size: int | None = None
    """--padded-vocab-size: explicit padded vocab (mg output)."""
    max_shard_size: int = 5 * 10**9
    """--max-shard-size: bytes per HF safetensors shard."""
    lora_load: str | None = None
    """--lora-load: LoRA training checkpoint whose adapters are merged into --load-dir's base (or exported)."""
    lora_r: int | None = None
    """--lora-r: the adapters' rank (checked against the checkpoint)."""
    lora_alpha: float | None = None
    """--lora-alpha: merged as W + (alpha / r) B A."""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """--lora-target-modules: the megatron linears the adapters may adapt."""
    save_lora_to_hf: bool = False
    """--save-lora-to-hf: write the adapters as a PEFT adapter folder (--save-dir) instead of merged weights."""
    transformer_impl: str | None = None
    """--transformer-impl (mg output): weight names of megatron-core's local spec (input_layernorm,
    pre_mlp_layernorm) or its transformer_engine spec (norms fused into linear_qkv / linear_fc1 as
    layer_norm_weight); default local from HF, the source's own from mg. Training loads either."""

    def __post_init__(self) -> None:
        _check(self.load_model_type in ("hf", "mg"), "--load-model-type must be hf or mg")
        _check(self.save_model_type in ("hf", "mg"), "--save-model-type must be hf or mg")
        _check(
            (self.load_model_type, self.save_model_type) != ("hf", "hf"),
            "--load-model-type hf --save-model-type hf is not a conversion",
        )
        _check(self.target_tensor_parallel_size >= 1, "--target-tensor-parallel-size must be >= 1")
        _check(self.target_pipeline_parallel_size >= 1, "--target-pipeline-parallel-size must be >= 1")
        if self.num_layer_list is not None:
            _check(
                len(self.num_layer_list) == self.target_pipeline_parallel_size and min(self.num_layer_list) > 0,
                f"--num-layer-list {','.join(map(str, self.num_layer_list))} needs "
                f"{self.target_pipeline_parallel_size} positive entries (--target-pipeline-parallel-size)",
            )
        _check(self.params_dtype in (None, *DTYPES), "--params-dtype must be fp32, bf16 or fp16")
        _check(self.make_vocab_size_divisible_by >= 1, "--make-vocab-size-divisible-by must be >= 1")
        _check(self.max_shard_size > 0, "--max-shard-size must be positive")
        _check(self.lora_load is None or (self.lora_r is not None and self.lora_alpha is not None),
               "--lora-load needs --lora-r and --lora-alpha")
        _check(self.lora_r is None or self.lora_r > 0, "--lora-r must be > 0")
        _check(self.lora_load is None or self.load_model_type == "mg", "--lora-load needs --load-model-type mg")
        _check(not self.save_lora_to_hf or (self.lora_load is not None and self.save_model_type == "hf"),
               "--save-lora-to-hf needs --lora-load and --save-model-type hf")
        _check(self.transformer_impl in (None, "local", "transformer_engine"),
               "--transformer-impl must be local or transformer_engine")
        _check(self.transformer_impl is None or self.save_model_type == "mg",
               "--transformer-impl names megatron weights: it needs --save-model-type mg")
        _check(
            Path(self.load_dir).resolve() != Path(self.save_dir).resolve(),
            "--save-dir must differ from --load-dir",
        )

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.params_dtype] if self.params_dtype else None


@contextmanager
def staged_output(save_dir: str | Path) -> Iterator[Path]:
    """Yields a hidden sibling directory to write into; renamed to `save_dir` only if the body succeeds.

    A failed conversion leaves no partial output, and never touches an existing non-empty directory.
    """
    final = Path(save_dir)
    _check(not final.exists() or (final.is_dir() and not any(final.iterdir())),
           f"--save-dir {final} already exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        yield staging
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
