"""What every conversion direction shares: its config, its error type, and all-or-nothing output."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import socket
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from engine.arguments import LORA_TARGETS, int_list
from engine.checkpoint.layout import CheckpointError
from engine.model.families import FAMILIES
from engine.options import ConfigError, Section, option

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the path or flag at fault."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def parse_size(text: str) -> int:
    """argparse type of --max-shard-size: '5GB', '500MB', '1000000' -> bytes (decimal units, as HF's)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for suffix, scale in units.items():
        if upper.endswith(suffix) and upper[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[: -len(suffix)]) * scale)
    if not upper.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes or a size like 5GB")
    return int(upper)


@dataclass
class ConvertConfig(Section):
    """One conversion: hf -> mg, mg -> hf, or mg -> mg (reshard). MindSpeed-LLM flag names."""

    load_model_type: str = option(help="input format", choices=("hf", "mg"))
    save_model_type: str = option(help="output format", choices=("hf", "mg"))
    load_dir: str = option(help="HF folder or Megatron checkpoint root")
    save_dir: str = option(help="created by the conversion; must not exist or be empty")
    target_tensor_parallel_size: int = option(1, "TP of the mg output")
    target_pipeline_parallel_size: int = option(1, "PP of the mg output")
    target_expert_parallel_size: int = option(1, "EP of the mg output (MoE models): each expert-parallel rank's "
                                                 "files hold its experts (Megatron-LM's mp_rank_TT[_PPP]_EEE)")
    target_expert_tensor_parallel_size: int | None = option(
        None, "ETP of the mg output (MoE models), a divisor of --target-tensor-parallel-size: each routed expert's "
              "linears are split over ETP (whole under 1), the file of TP rank t holding expert-TP rank t mod ETP's "
              "slice; default --target-tensor-parallel-size")
    num_layer_list: tuple[int, ...] | None = option(None, "layers per pipeline stage (uneven PP), e.g. 3,5; "
                                                          "default an even split", type=int_list, metavar="N1,N2,...")
    model_type_hf: str | None = option(None, f"family, one of {', '.join(FAMILIES)}; default from config.json "
                                             "(hf input) or the checkpoint's args")
    params_dtype: str | None = option(None, "cast the weights; default keep the stored dtype", choices=tuple(DTYPES))
    add_qkv_bias: bool = option(False, "accepted for MindSpeed-LLM scripts; must agree with the family")
    tokenizer_model: str | None = option(None, "tokenizer folder or file to record (hf -> mg) or copy (mg -> hf)")
    load_iteration: int | None = option(None, "mg input iteration; default the tracker's")
    make_vocab_size_divisible_by: int = option(128, "padded vocab is a multiple of this x target TP")
    padded_vocab_size: int | None = option(None, "explicit padded vocab (mg output)")
    max_shard_size: int = option(5 * 10**9, "bytes per HF safetensors shard, e.g. 5GB", type=parse_size)
    lora_load: str | None = option(None, "LoRA training checkpoint (adapter-only or full) whose adapters are "
                                         "merged into --load-dir's base, or exported")
    lora_r: int | None = option(None, "the adapters' rank, required with --lora-load (checked against the "
                                      "checkpoint)")
    lora_alpha: float | None = option(None, "the run's --lora-alpha, required with --lora-load: merged as "
                                            "W + (alpha / r) B A")
    lora_target_modules: list[str] = option(default_factory=lambda: list(LORA_TARGETS), choices=LORA_TARGETS,
                                            help="the megatron linears the adapters may adapt")
    save_lora_to_hf: bool = option(False, "write the adapters as a PEFT adapter folder (adapter_config.json, "
                                          "adapter_model.safetensors) to --save-dir instead of merged weights")
    model_type: str = option("GPT", "accepted for MindSpeed-LLM scripts", choices=("GPT",))
    transformer_impl: str | None = option(
        None, "mg output weight names: megatron-core's local spec (input_layernorm, pre_mlp_layernorm) or its "
              "transformer_engine spec (norms fused into linear_qkv / linear_fc1 as layer_norm_weight); default "
              "local from hf, the source's own from mg; training loads either",
        choices=("local", "transformer_engine"))

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ConfigError as err:
            raise ConversionError(str(err)) from None

    def check(self) -> None:
        _check(
            (self.load_model_type, self.save_model_type) != ("hf", "hf"),
            "--load-model-type hf --save-model-type hf is not a conversion",
        )
        _check(self.target_tensor_parallel_size >= 1, "--target-tensor-parallel-size must be >= 1")
        _check(self.target_pipeline_parallel_size >= 1, "--target-pipeline-parallel-size must be >= 1")
        _check(self.target_expert_parallel_size >= 1, "--target-expert-parallel-size must be >= 1")
        _check(self.target_expert_tensor_parallel_size is None or self.target_expert_tensor_parallel_size >= 1,
               "--target-expert-tensor-parallel-size must be >= 1")
        if self.num_layer_list is not None:
            _check(
                len(self.num_layer_list) == self.target_pipeline_parallel_size and min(self.num_layer_list) > 0,
                f"--num-layer-list {','.join(map(str, self.num_layer_list))} needs "
                f"{self.target_pipeline_parallel_size} positive entries (--target-pipeline-parallel-size)",
            )
        _check(self.make_vocab_size_divisible_by >= 1, "--make-vocab-size-divisible-by must be >= 1")
        _check(self.max_shard_size > 0, "--max-shard-size must be positive")
        _check(self.lora_load is None or (self.lora_r is not None and self.lora_alpha is not None),
               "--lora-load needs --lora-r and --lora-alpha")
        _check(self.lora_r is None or self.lora_r > 0, "--lora-r must be > 0")
        _check(self.lora_load is None or self.load_model_type == "mg", "--lora-load needs --load-model-type mg")
        _check(not self.save_lora_to_hf or (self.lora_load is not None and self.save_model_type == "hf"),
               "--save-lora-to-hf needs --lora-load and --save-model-type hf")
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
    The staging directory is made like `mkdir` makes one (0777 less the umask), not private as
    `tempfile.mkdtemp` would (0700): a converted checkpoint on a shared cluster is for teammates to
    read. An existing empty `save_dir` is replaced by the rename, so its mode is carried over.
    """
    final = Path(save_dir)
    _check(not final.exists() or (final.is_dir() and not any(final.iterdir())),
           f"--save-dir {final} already exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    _remove_abandoned_staging(final, host)
    staging = final.parent / f".{final.name}.staging-{host}-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        if final.exists():
            staging.chmod(stat.S_IMODE(final.stat().st_mode))
        yield staging
        if final.exists():
            final.rmdir()
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned_staging(final: Path, host: str) -> None:
    """Deletes the staging directories that killed conversions to `final` on this host left behind.

    Only those whose process is gone: a conversion still running here, or one on another node of a
    shared filesystem (another host name), is left alone.
    """
    prefix = f".{final.name}.staging-{host}-"
    for staging in final.parent.glob(f"{prefix}*"):
        pid = staging.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            logger.info("removing %s, left by a conversion (pid %s) that did not finish", staging, pid)
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
