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
import shlex
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# megatron-core warns on import that it falls back from TE/apex; conversion uses neither
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from engine.checkpoint.layout import CheckpointError  # noqa: E402
from engine.convert.common import ConvertConfig  # noqa: E402
from engine.convert.run import run_conversion  # noqa: E402
from engine.model.families import UnsupportedModelError  # noqa: E402
from engine.options import add_options, section_from_args  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The converter's parser, generated from ConvertConfig's declarations."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_options(parser, ConvertConfig, "conversion")
    return parser


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return section_from_args(ConvertConfig, args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        flags = run_conversion(config_from_args(args))
    except (CheckpointError, UnsupportedModelError, ValueError) as err:
        print(f"convert_ckpt.py: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a read-only or missing path: the OS's message names the file
        print(f"convert_ckpt.py: error: {err}", file=sys.stderr)
        return 1
    if flags:
        print("pretrain_dpo.py model flags (add --seq-length and the data/training flags):")
        print(shlex.join(flags))  # a --moe-layer-freq pattern has [ and *: quoted for the shell
    return 0


if __name__ == "__main__":
    sys.exit(main())
