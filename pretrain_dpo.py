"""DPO training: `torchrun --nproc-per-node N pretrain_dpo.py --stage dpo <flags>`.

Flags follow Megatron-LM / MindSpeed-LLM (see engine/arguments.py and the README).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from engine.arguments import parse_args, plain_config
from engine.tokenizer import vocab_size_of


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines list every parameter
    config = parse_args(argv, vocab_size_of=vocab_size_of, for_training=True)
    if config.logging.validate_only:
        print(json.dumps(plain_config(config), indent=1, default=str))
        return 0

    from engine.data.readers import DataError
    from engine.checkpoint.layout import CheckpointError
    from engine.training.run_lock import SaveDirLockedError
    from engine.training.trainer import DPOTrainer, TrainingDivergedError

    try:
        trainer = DPOTrainer(config)
    except (ValueError, CheckpointError, DataError, SaveDirLockedError) as err:
        print(f"pretrain_dpo.py: error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except TrainingDivergedError as err:
        print(f"pretrain_dpo.py: error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
