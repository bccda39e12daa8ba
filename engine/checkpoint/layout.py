"""The Megatron-LM checkpoint layout on disk, shared by training and the converters.

```
ROOT/latest_checkpointed_iteration.txt        "N" (or "release")
ROOT/iter_000000N/mp_rank_TT/model_optim_rng.pt        PP == 1
ROOT/iter_000000N/mp_rank_TT_PPP/model_optim_rng.pt    PP > 1
ROOT/iter_000000N/mp_rank_TT[_PPP]_EEE/model_optim_rng.pt  EP > 1 (expert parallel rank EEE, as Megatron-LM names it)
ROOT/iter_000000N/manifest.json                        checksums of the files above
```
With an expert tensor-parallel size (ETP) below TP, only the (TP rank, EP rank) pairs that some training rank
holds have a file (`stage_files`): Megatron-LM names a rank's file by its TP and EP ranks, and the file holds
that rank's expert shard, expert-TP rank `TT % ETP` (whole experts under ETP1).
Each file holds `model` (`model0`, `model1`, ... under virtual pipeline stages), and
where present `optimizer`, `opt_param_scheduler`, `rng_state`, `iteration`, `args`,
`checkpoint_version`. Writes are atomic: ranks write into a hidden staging directory,
which is renamed to `iter_*` once complete, and the tracker file is replaced last, so
a crash at any moment leaves the previous checkpoint loadable. Loading checks each file
against the iteration's manifest (manifest.py).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch

from engine.checkpoint.manifest import MANIFEST_FILE, file_sha256, read_manifest, save_hashed, write_manifest

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the run; names the path."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """Megatron-LM's get_checkpoint_name: the pipeline rank under PP, then the expert rank under EP."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def stage_files(tp: int, ep: int = 1, etp: int | None = None) -> list[tuple[int, int]]:
    """The (TP rank, EP rank) files of one pipeline stage.

    megatron-core numbers a stage's ranks r = 0, 1, ... as TP rank r % TP for the dense layers and as expert-TP
    rank r % ETP, EP rank (r // ETP) % EP for the experts; the pattern repeats every lcm(TP, ETP x EP) ranks,
    which divides the stage's rank count. Each pair found there is a file; with ETP == TP that is every pair.
    ETP must divide TP, so that a file's pair fixes the expert shard it holds (expert-TP rank TT % ETP).
    """
    etp = tp if etp is None else etp
    if tp % etp:
        raise CheckpointError(f"an expert tensor-parallel size {etp} that does not divide the tensor-parallel size "
                              f"{tp} has no file layout (Megatron-LM names files by TP and EP rank only)")
    period = tp * etp * ep // math.gcd(tp, etp * ep)
    return sorted({(r % tp, (r // etp) % ep) for r in range(period)})


def staging_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f".staging_{iteration_dir_name(iteration)}"


def rank_file(base: str | Path, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
              ep_size: int = 1) -> Path:
    return Path(base) / rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size) / CHECKPOINT_FILE


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
                     state: dict, ep_rank: int = 0, ep_size: int = 1) -> Path:
    """Writes one rank's file, with its checksum, into the staging directory of `iteration` (not yet visible)."""
    path = rank_file(staging_dir(root, iteration), tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_hashed(state, path)
    except (OSError, RuntimeError) as err:
        path.unlink(missing_ok=True)  # a partial file only takes the space a retry needs
        raise CheckpointError(write_failure(path, err, _tensor_bytes(state))) from None
    return path


def write_failure(path: Path, err: Exception, needed: int | None) -> str:
    """One line for a failed checkpoint write: torch reports a full disk as `basic_ios::clear: iostream error`
    or `PytorchStreamWriter failed writing file`, which names neither the directory nor the space."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    size = f", the file needs about {_human(needed)}" if needed else ""
    return (f"could not write {path} ({reason}): {_human(free)} free on the file system of {existing}{size}; "
            "free space there or save elsewhere")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def publish(root: str | Path, iteration: int) -> Path:
    """Makes a fully written staging directory the checkpoint of `iteration`, then points the tracker at it.

    Called once (by one process) after every rank's file is written.
    """
    root = Path(root)
    final = root / iteration_dir_name(iteration)
    write_manifest(staging_dir(root, iteration))
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


def load_rank_state(root: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp_size: int,
                    verify: bool = True, ep_rank: int = 0, ep_size: int = 1) -> dict:
    """One rank's file of a published iteration, checked against the manifest unless `verify` is False."""
    path = rank_file(Path(root) / iteration_dir_name(iteration), tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: is iteration {iteration} of {root} saved with this TP/PP/EP layout "
            f"(rank dir {rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size)})?"
        )
    if verify:
        verify_files(Path(root) / iteration_dir_name(iteration), [path], skip_flag="--no-verify-checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)


def verify_files(directory: Path, paths: list[Path] | None = None, skip_flag: str | None = None) -> None:
    """Checks files of a saved iteration (default: all it lists) against its manifest.json; an iteration saved
    without one (older checkpoints, other tools) is accepted with an info line. Errors offer `skip_flag`,
    the caller's way to load anyway, where it has one."""
    manifest = directory / MANIFEST_FILE
    skip = f", or pass {skip_flag} to load it as it is" if skip_flag else ""
    try:
        files = read_manifest(directory)
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest} is unreadable ({err}): copy it again from the source{skip}") from None
    if files is None:
        logger.info("%s has no %s (saved without checksums): loading it unverified", directory, MANIFEST_FILE)
        return
    for path in paths if paths is not None else [directory / name for name in files]:
        entry = files.get(path.relative_to(directory).as_posix())
        if entry is None:
            raise CheckpointError(f"{path} is not listed in {manifest}: it was added after the checkpoint was "
                                  f"saved; copy the checkpoint again from the source{skip}")
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            found = "it is missing" if size is None else f"{size} bytes now, {entry['bytes']} when saved"
            raise CheckpointError(
                f"{path} does not match its checksum in {manifest} ({found}): the file changed after it was saved "
                f"(a partial copy, a disk error); copy it again from the source{skip}"
            )


def discover_parallel_layout(root: str | Path, iteration: int, expert_parallel: bool = False,
                             expert_tensor_parallel_size: int | None = None) -> tuple[int, int, int]:
    """(TP, PP, EP) sizes of a saved iteration, read from its mp_rank_* directory names.

    `mp_rank_TT_NNN` is ambiguous in Megatron-LM's naming (pipeline rank under PP, expert rank under EP
    without PP); `expert_parallel` says which, as the checkpoint's recorded args do for Megatron-LM. The files
    must be `stage_files` of every pipeline stage for the recorded ETP (`expert_tensor_parallel_size`), or,
    when that is unknown (None), for some divisor of TP (its args then say which).
    """
    base = Path(root) / iteration_dir_name(iteration)
    if not base.is_dir():
        raise CheckpointError(f"{base} does not exist: iteration {iteration} is not saved in {root}")
    ranks = set()
    for entry in base.iterdir():
        parts = entry.name.split("_")
        if entry.is_dir() and parts[:2] == ["mp", "rank"] and len(parts) in (3, 4, 5):
            numbers = [int(part) for part in parts[2:]]
            if len(numbers) == 2:
                numbers = numbers + [0] if not expert_parallel else [numbers[0], 0, numbers[1]]
            ranks.add(tuple(numbers) + (0,) * (3 - len(numbers)))
    if not ranks:
        raise CheckpointError(f"{base} holds no mp_rank_* directories")
    tp, pp, ep = (1 + max(r[i] for r in ranks) for i in range(3))
    etps = ([expert_tensor_parallel_size] if expert_tensor_parallel_size
            else [d for d in range(tp, 0, -1) if tp % d == 0])
    for etp in etps:
        expected = {(t, p, e) for t, e in stage_files(tp, ep, etp) for p in range(pp)}
        if ranks == expected:
            return tp, pp, ep
    expected = {(t, p, e) for t, e in stage_files(tp, ep, etps[0]) for p in range(pp)}
    missing = sorted(rank_dir_name(t, p, pp, e, ep) for t, p, e in expected - ranks)
    if missing:
        raise CheckpointError(f"{base} is incomplete: missing {', '.join(missing)}")
    extra = sorted(rank_dir_name(t, p, pp, e, ep) for t, p, e in ranks - expected)
    raise CheckpointError(f"{base} holds {', '.join(extra)}, which its recorded expert_tensor_parallel_size "
                          f"{etps[0]} does not have: the args do not match the files")
