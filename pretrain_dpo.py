"""DPO training: `torchrun --nproc-per-node N pretrain_dpo.py --stage dpo <flags>`.

Flags follow Megatron-LM / MindSpeed-LLM (see engine/arguments.py and the README). Exit codes of each
process: 0 done (also after a stop by --exit-signal-handler, --exit-interval, --exit-duration-in-mins),
2 a known error (flags: usage and message; data, checkpoint, save directory: one line from rank 0),
3 training diverged. torchrun turns any non-zero worker exit into its own exit code 1
(docs/troubleshooting.md, "Exit codes").
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
        try:
            trainer.train()
        finally:
            trainer.close()
    except TrainingDivergedError as err:
        return _fail(err, 3, rank)
    except (ValueError, CheckpointError, DataError, SaveDirLockedError) as err:
        return _fail(err, 2, rank)
    return 0


def _fail(err: Exception, code: int, rank: int) -> int:
    """Every rank raises these errors with the same message (the first failing rank's), so rank 0 prints it."""
    if rank == 0:
        print(f"pretrain_dpo.py: error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
