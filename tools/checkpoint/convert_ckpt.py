"""Convert checkpoints between HF and megatron-core (MindSpeed-LLM compatible flags).

  hf -> mg:  --load-model-type hf --save-model-type mg --load-dir HF --save-dir MG
             --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 [--num-layer-list 3,5]
  mg -> hf:  --load-model-type mg --save-model-type hf --load-dir MG --save-dir HF [--load-iteration N]
  mg -> mg:  --load-model-type mg --save-model-type mg --load-dir A --save-dir B (reshard to the target layout)
  TE names:  add --transformer-impl transformer_engine (or local) to write mg weights under that spec's names;
             mg input may use either
  LoRA:      add --lora-load RUN --lora-r 16 --lora-alpha 32 [--lora-target-modules ...] to merge a LoRA run's
             adapters into --load-dir's base (mg or hf output), or --save-lora-to-hf for a PEFT adapter folder
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.arguments import int_list  # noqa: E402
from engine.convert.common import ConvertConfig, parse_size  # noqa: E402
from engine.convert.run import run_conversion  # noqa: E402
from engine.model.families import FAMILIES, UnsupportedModelError  # noqa: E402
from engine.checkpoint.layout import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model-type", default="GPT", choices=["GPT"], help="MindSpeed-LLM compatibility")
    parser.add_argument("--load-model-type", required=True, choices=["hf", "mg"])
    parser.add_argument("--save-model-type", required=True, choices=["hf", "mg"])
    parser.add_argument("--load-dir", required=True)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1)
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--num-layer-list", type=int_list, help="layers per pipeline stage, e.g. 3,5")
    parser.add_argument("--model-type-hf", help=f"one of {', '.join(FAMILIES)}; default from config.json")
    parser.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], help="default: keep the stored dtype")
    parser.add_argument("--add-qkv-bias", action="store_true")
    parser.add_argument("--tokenizer-model", help="tokenizer folder or file to record (-> mg) or copy (-> hf)")
    parser.add_argument("--load-iteration", type=int)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--padded-vocab-size", type=int)
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--transformer-impl", choices=["local", "transformer_engine"],
                        help="mg output weight names: megatron-core's local spec (input_layernorm, pre_mlp_layernorm) "
                             "or its TE spec (norms fused into linear_qkv / linear_fc1); default local from hf, "
                             "the source's from mg; training loads either")
    lora = parser.add_argument_group("lora", "merge a LoRA run's adapters into --load-dir, or export them")
    lora.add_argument("--lora-load", help="LoRA training checkpoint (adapter-only or full)")
    lora.add_argument("--lora-r", type=int)
    lora.add_argument("--lora-alpha", type=float)
    lora.add_argument("--lora-target-modules", nargs="+",
                      default=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    lora.add_argument("--save-lora-to-hf", action="store_true",
                      help="write a PEFT adapter (adapter_config.json, adapter_model.safetensors) to --save-dir")
    return parser


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return ConvertConfig(
        load_model_type=args.load_model_type, save_model_type=args.save_model_type, load_dir=args.load_dir,
        save_dir=args.save_dir, target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size, num_layer_list=args.num_layer_list,
        model_type_hf=args.model_type_hf, params_dtype=args.params_dtype, add_qkv_bias=args.add_qkv_bias,
        tokenizer_model=args.tokenizer_model, load_iteration=args.load_iteration,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, padded_vocab_size=args.padded_vocab_size,
        max_shard_size=parse_size(args.max_shard_size), lora_load=args.lora_load, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_target_modules=tuple(args.lora_target_modules),
        save_lora_to_hf=args.save_lora_to_hf, transformer_impl=args.transformer_impl,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        flags = run_conversion(config_from_args(args))
    except (CheckpointError, UnsupportedModelError, ValueError) as err:
        print(f"convert_ckpt.py: error: {err}", file=sys.stderr)
        return 1
    if flags:
        print("pretrain_dpo.py model flags (add --seq-length and the data/training flags):")
        print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
