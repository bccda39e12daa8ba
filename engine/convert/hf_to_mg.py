"""HF folder -> Megatron-LM checkpoint (iteration 1) for the requested TP/PP layout.

Memory: HF tensors are read lazily (safetensors maps the files), one unit (one layer) at
a time, and sliced per TP rank at once; a pipeline stage's rank files are written as soon
as the stream leaves the stage, because torch.save needs a rank's whole state dict. The
converter holds about one pipeline stage's shards (the whole model at PP1) plus one full
layer; resident memory also counts the clean, reclaimable pages of the mapped HF files
already read. benchmarks/RESULTS.md has the measured figures (1.1B bf16: 1.3 GiB held,
3.4 GiB RSS including the mapped input).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path
from typing import Any

from engine.arguments import ConfigError, ModelConfig, MoEConfig, check_expert_layout, check_layout
from engine.convert.common import ConvertConfig, ConversionError, staged_output
from engine.convert.hf_io import HFCheckpoint, has_tokenizer
from engine.convert.mapping import CLASSIFIER_SUFFIX, SCORE, hf_to_mcore_units
from engine.convert.mg_io import MegatronWriter
from engine.checkpoint.sharding import ShardLayout
from engine.model.families import UnsupportedModelError, detect_family, get_family, model_args, pretrain_flags

log = logging.getLogger(__name__)


def model_config(args: dict[str, Any], config: ConvertConfig) -> ModelConfig:
    """The training description (engine.arguments.ModelConfig) of the converted model, padded for the
    target layout; the layout rules are training's own (`check_layout`), named by the converter's flags."""
    # A megatron source's args already record the padding rule and seq_length; the converter's flags decide.
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"seq_length", "make_vocab_size_divisible_by",
                                                                   "padded_vocab_size"}
    try:
        model = ModelConfig(**{k: v for k, v in args.items() if k in fields}, seq_length=args["max_position_embeddings"],
                            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                            padded_vocab_size=config.padded_vocab_size)
        check_layout(model, config.target_tensor_parallel_size, config.target_pipeline_parallel_size,
                     config.num_layer_list, tp_flag="--target-tensor-parallel-size",
                     pp_flag="--target-pipeline-parallel-size")
        moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
        moe = MoEConfig(**{k: v for k, v in args.items() if k in moe_fields and v is not None})
        tp = config.target_tensor_parallel_size
        check_expert_layout(model, moe, tp, config.target_expert_parallel_size,
                            config.target_expert_tensor_parallel_size or tp, ep_flag="--target-expert-parallel-size",
                            etp_flag="--target-expert-tensor-parallel-size", tp_flag="--target-tensor-parallel-size")
    except ConfigError as err:
        raise ConversionError(f"{config.load_dir}: {err}") from None
    return model


def target_layout(args: dict[str, Any], config: ConvertConfig) -> ShardLayout:
    """The output layout; also records it (and the padding rule) in `args`."""
    tp, pp = config.target_tensor_parallel_size, config.target_pipeline_parallel_size
    ep, etp = config.target_expert_parallel_size, config.target_expert_tensor_parallel_size or tp
    padded = model_config(args, config).padded_vocab(tp)
    args["make_vocab_size_divisible_by"] = config.make_vocab_size_divisible_by
    args["padded_vocab_size"] = config.padded_vocab_size
    args.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp if args.get("num_experts") else None,
                num_layer_list=list(config.num_layer_list) if config.num_layer_list else None)
    return ShardLayout(
        num_layers=args["num_layers"], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        layers_per_stage=config.num_layer_list, swiglu=True,
        tied_embeddings=not args["untie_embeddings_and_output_weights"], padded_vocab_size=padded,
        num_experts=args.get("num_experts"), expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if args.get("num_experts") else None,
    )


def layout_flags(args: dict[str, Any]) -> list[str]:
    """pretrain_dpo.py flags for the architecture, the layout and the dtype recorded in `args`."""
    flags = pretrain_flags(args)
    flags += ["--tensor-model-parallel-size", str(args["tensor_model_parallel_size"]),
              "--pipeline-model-parallel-size", str(args["pipeline_model_parallel_size"])]
    if args.get("num_layer_list"):
        flags += ["--num-layer-list", ",".join(map(str, args["num_layer_list"]))]
    if args.get("expert_model_parallel_size", 1) > 1:
        flags += ["--expert-model-parallel-size", str(args["expert_model_parallel_size"])]
    if args.get("expert_tensor_parallel_size") not in (None, args["tensor_model_parallel_size"]):
        flags += ["--expert-tensor-parallel-size", str(args["expert_tensor_parallel_size"])]
    if args.get("params_dtype") in ("bf16", "fp16"):
        flags.append(f"--{args['params_dtype']}")
    return flags


def convert_hf_to_mg(config: ConvertConfig) -> list[str]:
    """Converts and returns the pretrain_dpo.py flags that build the converted model."""
    hf = HFCheckpoint(config.load_dir)
    try:
        detected = detect_family(hf.config)
        family = get_family(config.model_type_hf) if config.model_type_hf else detected
        if family.model_type != detected.model_type:
            raise UnsupportedModelError(f"--model-type-hf {family.name} expects model_type {family.model_type!r}")
        args = model_args(family, hf.config)
    except UnsupportedModelError as err:
        raise ConversionError(f"{config.load_dir}/config.json: {err}") from None
    if config.add_qkv_bias and not args["add_qkv_bias"]:
        raise ConversionError(f"--add-qkv-bias, but family {family.name} has no q/k/v biases")
    window = hf.config.get("sliding_window")
    if window and hf.config.get("use_sliding_window", True) and window < args["max_position_embeddings"]:
        log.warning("sliding_window %d is ignored: megatron-core attends over the whole sequence", window)
    architecture = (hf.config.get("architectures") or [""])[0]
    reward_model = architecture.endswith(CLASSIFIER_SUFFIX)
    if reward_model:
        labels = len(hf.config.get("id2label") or {0: 0})
        if labels != 1:
            raise ConversionError(f"{config.load_dir}/config.json: {architecture} with {labels} labels; a reward model "
                                  "has num_labels 1")
        args["value_head_init"] = {"from": f"{SCORE} of {Path(config.load_dir).resolve()}"}
    layout = target_layout(args, config)
    tokenizer = config.tokenizer_model or (config.load_dir if has_tokenizer(config.load_dir) else None)
    args.update(
        family=family.name,
        tokenizer=str(Path(tokenizer).resolve()) if tokenizer else None,
        params_dtype=config.params_dtype or hf.dtype_name(family.names.embedding),
        hf_config=hf.config,
    )
    with staged_output(config.save_dir) as staging:
        writer = MegatronWriter(staging, layout, args, config.dtype)
        for unit in hf_to_mcore_units(hf.read, family, args, te=config.transformer_impl == "transformer_engine",
                                      value_head=reward_model):
            writer.add(unit)
        if not args["untie_embeddings_and_output_weights"] and hf.has(family.names.output):
            hf.skip(family.names.output)
        hf.check_all_read()
        writer.close()
    flags = layout_flags(args)
    log.info("converted %s (%s%s) -> %s; pretrain_dpo.py model flags:\n%s", config.load_dir, family.name,
             " reward model: train it with --stage rm" if reward_model else "", config.save_dir, shlex.join(flags))
    return flags
