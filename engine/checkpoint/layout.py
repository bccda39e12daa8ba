"""The Megatron-LM checkpoint layout on disk, shared by training and the converters.

```
ROOT/latest_checkpointed_iteration.txt        "N" (or "release")
ROOT/iter_000000N/mp_rank_TT/model_optim_rng.pt        PP == 1
ROOT/iter_000000N/mp_rank_TT_PPP/model_optim_rng.pt    PP > 1
```
Each file holds `model` (`model0`, `model1`, ... under virtual pipeline stages), and
where present `optimizer`, `opt_param_scheduler`, `rng_state`, `iteration`, `args`,
`checkpoint_version`. Writes are atomic: ranks write into a hidden staging directory,
which is renamed to `iter_*` once complete, and the tracker file is replaced last, so
a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the run; names the path."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def staging_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f".staging_{iteration_dir_name(iteration)}"


def rank_file(base: str | Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    return Path(base) / rank_dir_name(tp_rank, pp_rank, pp_size) / CHECKPOINT_FILE


def read_tracker(root: str | Path) -> int | None:
    """The latest published iteration, or None when ROOT holds no tracker file."""
    path = Path(root) / TRACKER_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}") from None


def incomplete_checkpoints(root: str | Path) -> list[Path]:
    """Staging directories left by saves that were interrupted (never published, so never loaded)."""
    root = Path(root)
    return sorted(root.glob(".staging_iter_*")) + sorted(root.glob(".replaced_iter_*")) if root.is_dir() else []


def write_rank_state(root: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp_size: int,
                     state: dict) -> Path:
    """Writes one rank's file into the staging directory of `iteration` (not yet visible)."""
    path = rank_file(staging_dir(root, iteration), tp_rank, pp_rank, pp_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def publish(root: str | Path, iteration: int) -> Path:
    """Makes a fully written staging directory the checkpoint of `iteration`, then points the tracker at it.

    Called once (by one process) after every rank's file is written.
    """
    root = Path(root)
    final = root / iteration_dir_name(iteration)
    if final.exists():
        old = root / f".replaced_{iteration_dir_name(iteration)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging_dir(root, iteration), final)
        shutil.rmtree(old)
    else:
        os.replace(staging_dir(root, iteration), final)
    tracker_tmp = root / f".{TRACKER_FILE}.tmp"
    tracker_tmp.write_text(str(iteration))
    os.replace(tracker_tmp, root / TRACKER_FILE)
    return final


def load_rank_state(root: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> dict:
    path = rank_file(Path(root) / iteration_dir_name(iteration), tp_rank, pp_rank, pp_size)
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: is iteration {iteration} of {root} saved with this TP/PP layout "
            f"(rank dir {rank_dir_name(tp_rank, pp_rank, pp_size)})?"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def discover_parallel_layout(root: str | Path, iteration: int) -> tuple[int, int]:
    """(TP, PP) sizes of a saved iteration, read from its mp_rank_* directory names."""
    base = Path(root) / iteration_dir_name(iteration)
    if not base.is_dir():
        raise CheckpointError(f"{base} does not exist: iteration {iteration} is not saved in {root}")
    ranks = set()
    for entry in base.iterdir():
        parts = entry.name.split("_")
        if entry.is_dir() and parts[:2] == ["mp", "rank"] and len(parts) in (3, 4):
            ranks.add((int(parts[2]), int(parts[3]) if len(parts) == 4 else 0))
    if not ranks:
        raise CheckpointError(f"{base} holds no mp_rank_* directories")
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    if ranks != expected:
        missing = sorted(rank_dir_name(t, p, pp) for t, p in expected - ranks)
        raise CheckpointError(f"{base} is incomplete: missing {', '.join(missing)}")
    return tp, pp
