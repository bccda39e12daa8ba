"""Precomputed reference log-probs (--precompute-ref-logps): one forward-only pass, then no reference weights.

The reference policy never changes during training, so its per-answer log-probs are a
function of the data alone. One pass over the train and valid splits (same forward code
and micro-batch layout as training, spread over the DP ranks) fills a table per split:
`[pairs, rows, 2]` with rows (log-prob sum, token count[, shared-length sum]) and the
chosen / rejected answer in the last dimension. Training then looks pairs up by index and
builds no reference model, which frees its weight memory and a third of the compute.

The table is stored with a fingerprint of everything it depends on (data files, split,
sequence length, reference checkpoint and iteration, the objective's rows); a later run
or a resume reuses it when the fingerprint matches and recomputes, saying why, when not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

logger = logging.getLogger(__name__)

CACHE_DIR = "reference_logps"
MICRO_BATCHES_PER_PASS = 8
"""Micro-batches per forward-only schedule call: enough to keep a pipeline busy."""


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def fingerprint(data_files: list[Path], split: str, seq_length: int, reference_root: str,
                reference_iteration: int, rows: int, adapters_off: bool) -> dict:
    """What the cached values depend on; any change means recomputing them."""
    reference_dir = Path(reference_root).resolve() / f"iter_{reference_iteration:07d}"
    reference_files = sorted(reference_dir.rglob("*.pt")) if reference_dir.is_dir() else []
    return {
        "data": [_file_stamp(p) for p in sorted(data_files)],
        "split": split,
        "seq_length": seq_length,
        "reference": [str(reference_dir), [_file_stamp(p) for p in reference_files]],
        "rows": rows,
        "adapters_off": adapters_off,
    }


def cache_path(directory: str | Path, stamp: dict) -> Path:
    digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / CACHE_DIR / f"{digest}.pt"


class CachedReference:
    """Reference log-probs looked up per pair: the same [rows, 2n] tensors a live reference returns."""

    forward_passes = 0

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def logps(self, micro_batches: list, split: str) -> list[torch.Tensor | None]:
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return [None] * len(micro_batches)
        table = self.tables[split]
        out = []
        for batch in micro_batches:
            values = table[torch.as_tensor(batch.pair_indices)]  # [n, rows, 2]
            out.append(torch.cat([values[..., 0], values[..., 1]]).T.contiguous())  # [rows, 2n]
        return out


def compute_table(reference, dataset, micro_batch_size: int, make_batch) -> torch.Tensor | None:
    """Runs `reference` over every pair of `dataset`; the full table on last-stage ranks, None elsewhere.

    Micro-batches of consecutive pairs are dealt round-robin to the DP ranks; each rank's results
    are gathered over DP on the last pipeline stage.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    starts = list(range(0, len(dataset), micro_batch_size))[dp_rank::dp_size]
    mine: list[tuple[list[int], torch.Tensor | None]] = []
    for group in range(0, len(starts), MICRO_BATCHES_PER_PASS):
        indices = [list(range(s, min(s + micro_batch_size, len(dataset))))
                   for s in starts[group:group + MICRO_BATCHES_PER_PASS]]
        results = reference.logps([make_batch(i) for i in indices], None)
        mine += [(i, None if r is None else r.cpu()) for i, r in zip(indices, results)]  # the table lives on CPU
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, [(i, r) for i, r in mine], group=parallel_state.get_data_parallel_group())
    table = None
    for indices, packed in (item for rank in gathered for item in rank):
        n = len(indices)
        per_pair = torch.stack([packed[:, :n].T, packed[:, n:].T], dim=-1)  # [n, rows, 2]
        if table is None:
            table = torch.full((len(dataset), packed.shape[0], 2), float("nan"), dtype=packed.dtype)
        table[torch.tensor(indices)] = per_pair
    if table is not None and torch.isnan(table).any():
        raise RuntimeError("reference log-probs missing for some pairs after the precompute pass")
    return table


def load_or_compute(path: Path, stamp: dict, splits: dict, build_reference, micro_batch_size: int,
                    make_batch) -> CachedReference:
    """The cache at `path` when its fingerprint matches; else compute it with a temporary reference
    (built by `build_reference()`, freed afterwards) and write it once."""
    if path.is_file():
        stored = torch.load(path, weights_only=False)
        if stored.get("fingerprint") == stamp:
            logger.info("reference log-probs: reusing %s (fingerprint matches)", path)
            return CachedReference(stored["tables"])
    others = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
    logger.info("reference log-probs: computing %s (%s)", path,
                f"fingerprint differs from {others}: data or reference changed" if others else "no cache yet")
    reference = build_reference()
    tables = {split: compute_table(reference, dataset, micro_batch_size, lambda idx, s=split: make_batch(s, idx))
              for split, dataset in splits.items() if dataset is not None}
    del reference
    writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_data_parallel_rank() == 0)
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"fingerprint": stamp, "tables": tables}, tmp)
        os.replace(tmp, path)
    # Every last-stage rank already holds the whole tables (gathered over DP); other stages never read them.
    return CachedReference(tables)
