"""Reading and writing Megatron-LM checkpoints as a stream of full (TP1) tensor units.

A unit is the embedding, one decoder layer, or the final norm with the output layer,
under megatron-core names with global layer numbers. The reader merges TP shards one
unit at a time from memory-mapped rank files; the writer shards units for its target
layout and writes a pipeline stage's rank files as soon as the stream moves past it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from engine.convert.common import ConversionError
from engine.convert.mapping import EMBEDDING, FINAL_NORM, OUTPUT
from engine.formats import VALUE_HEAD_KEY
from engine.checkpoint.sharding import ShardLayout, merge_chunk, shard_state_dict
from engine.checkpoint.layout import (
    CHECKPOINT_VERSION,
    CheckpointError,
    discover_parallel_layout,
    iteration_dir_name,
    publish,
    rank_file,
    read_tracker,
    stage_files,
    verify_files,
    write_rank_state,
)

log = logging.getLogger(__name__)

CONVERTED_ITERATION = 1
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                  "ffn_hidden_size", "vocab_size", "untie_embeddings_and_output_weights")


def _layer_index(key: str) -> int | None:
    match = _LAYER.match(key)
    return int(match.group(1)) if match else None


def _model_chunks(state: dict, path: Path) -> list[dict[str, torch.Tensor]]:
    """`model`, or `model0`, `model1`, ... under virtual pipeline stages."""
    if "model" in state:
        return [state["model"]]
    chunks = [state[f"model{i}"] for i in range(len(state)) if f"model{i}" in state]
    if not chunks:
        raise ConversionError(f"{path} holds no 'model' state dict")
    return chunks


class MegatronCheckpoint:
    """A saved iteration: its args, its layout (discovered from the files), and its tensors as units."""

    def __init__(self, root: str | Path, iteration: int | None = None):
        self.root = Path(root)
        if iteration is None:
            iteration = read_tracker(self.root)
            if iteration is None:
                raise ConversionError(f"--load-dir {self.root}: no latest_checkpointed_iteration.txt "
                                      "(pass --load-iteration)")
        self.iteration = iteration
        try:
            args = self._first_args()
            # Megatron-LM's mp_rank_TT_NNN is a pipeline rank, or an expert rank without PP: the args decide.
            expert_parallel = (args.get("expert_model_parallel_size", 1) > 1
                               and args.get("pipeline_model_parallel_size", 1) == 1)
            # ETP below TP: fewer files (stage_files); not recorded (older checkpoints): ETP == TP.
            self.etp = args.get("expert_tensor_parallel_size")
            self.tp, self.pp, self.ep = discover_parallel_layout(self.root, iteration, expert_parallel, self.etp)
            self.etp = self.etp or self.tp
            self.files = stage_files(self.tp, self.ep, self.etp)
            # The rank files this reads, against the iteration's checksums (not its optimizer files).
            verify_files(self.root / iteration_dir_name(iteration),
                         [self._path(t, p, e) for t, e in self.files for p in range(self.pp)])
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        first = self._load(0, 0)
        if not isinstance(args, dict) or any(args.get(k) is None for k in _REQUIRED_ARGS):
            raise ConversionError(f"{self._path(0, 0)}: 'args' lacks the model flags {', '.join(_REQUIRED_ARGS)}")
        self.args: dict[str, Any] = dict(args)
        self.layout = self._discover_layout(len(_model_chunks(first, self._path(0, 0))))

    def _first_args(self) -> dict:
        """The args of the first rank file (mp_rank_00, mp_rank_00_000 or mp_rank_00_000_000): {} if unreadable."""
        base = self.root / iteration_dir_name(self.iteration)
        for name in ("mp_rank_00", "mp_rank_00_000", "mp_rank_00_000_000"):
            path = base / name / "model_optim_rng.pt"
            if path.is_file():
                args = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("args")
                args = vars(args) if hasattr(args, "__dict__") else args
                return args if isinstance(args, dict) else {}
        return {}

    def _path(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        return rank_file(self.root / iteration_dir_name(self.iteration), tp_rank, pp_rank, self.pp, ep_rank, self.ep)

    def _load(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict:
        # Memory-mapped: tensors are paged in when a unit touches them, not all at once.
        return torch.load(self._path(tp_rank, pp_rank, ep_rank), map_location="cpu", mmap=True, weights_only=False)

    def _discover_layout(self, vpp: int) -> ShardLayout:
        counts = []
        for pp_rank in range(self.pp):
            chunks = _model_chunks(self._load(0, pp_rank), self._path(0, pp_rank))
            counts.append([len({_layer_index(k) for k in c if _layer_index(k) is not None}) for c in chunks])
        num_layers = self.args["num_layers"]
        if sum(map(sum, counts)) != num_layers:
            raise ConversionError(f"{self.root}: rank files hold {sum(map(sum, counts))} layers, args say {num_layers}")
        even = vpp == 1 or len({n for row in counts for n in row}) == 1
        if not even:
            raise ConversionError(f"{self.root}: uneven layers under virtual pipeline stages are not supported")
        return ShardLayout(
            num_layers=num_layers,
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_size=vpp if vpp > 1 else None,
            layers_per_stage=tuple(row[0] for row in counts) if vpp == 1 else None,
            swiglu=True,
            tied_embeddings=not self.args["untie_embeddings_and_output_weights"],
            expert_model_parallel_size=self.ep, num_experts=self.args.get("num_experts"),
            expert_tensor_parallel_size=self.etp,
        )

    def units(self) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors in stream order, vocab padding stripped. Rank files stay mapped until their
        stage's last unit is out, so resident memory follows one stage (all stages under VPP)."""
        layout, vocab = self.layout, self.args["vocab_size"]
        vp_stages = range(layout.virtual_pipeline_size) if layout.virtual_pipeline_size else [None]
        chunks = sorted(((p, v) for p in range(self.pp) for v in vp_stages),
                        key=lambda pv: layout.stage_layers(*pv).start)
        remaining = {p: len(vp_stages) for p in range(self.pp)}
        opened: dict[int, dict[tuple[int, int], list[dict]]] = {}
        for pp_rank, vp_stage in chunks:
            if pp_rank not in opened:  # by (TP rank, EP rank), as merge_chunk takes them
                opened[pp_rank] = {(t, e): _model_chunks(self._load(t, pp_rank, e), self._path(t, pp_rank, e))
                                   for t, e in self.files}
            ranks = {pair: chunks[vp_stage or 0] for pair, chunks in opened[pp_rank].items()}
            first, last = layout.is_first(pp_rank, vp_stage), layout.is_last(pp_rank, vp_stage)
            if first:
                yield self._merge(ranks, [EMBEDDING], pp_rank, vp_stage, vocab)
            by_layer: dict[int, list[str]] = {}
            for key in ranks[(0, 0)]:
                index = _layer_index(key)
                if index is not None and not key.endswith("_extra_state"):
                    by_layer.setdefault(index, []).append(key)
            for index in sorted(by_layer):
                yield self._merge(ranks, by_layer[index], pp_rank, vp_stage, vocab)
            if last:
                yield self._merge(ranks, [FINAL_NORM, OUTPUT, VALUE_HEAD_KEY], pp_rank, vp_stage, vocab)
            remaining[pp_rank] -= 1
            if not remaining[pp_rank]:
                del opened[pp_rank]

    def _merge(self, ranks: dict[tuple[int, int], dict], keys: list[str], pp_rank: int, vp_stage: int | None,
               vocab: int) -> dict[str, torch.Tensor]:
        present = [k for k in keys if k in ranks[(0, 0)]]
        # A reward model's last stage holds its value head instead of an output layer.
        optional = {OUTPUT} if self.layout.tied_embeddings or VALUE_HEAD_KEY in present else set()
        required = [k for k in keys if k not in optional and k != VALUE_HEAD_KEY]
        missing = sorted(set(required) - set(present))
        if missing:
            raise ConversionError(f"{self._path(0, pp_rank)}: missing {', '.join(missing)}")
        full = merge_chunk({pair: {k: r[k] for k in present} for pair, r in ranks.items()}, self.layout, pp_rank,
                           vp_stage)
        for key in (EMBEDDING, OUTPUT):
            if key in full:
                full[key] = full[key][:vocab]
        return full


class MegatronWriter:
    """Shards a unit stream for `layout` and writes each pipeline stage's rank files once it is complete.

    Stages are contiguous in the stream, so at most one stage's shards (1/PP of the model) are held,
    plus, for tied embeddings with PP > 1, the full embedding kept for the last stage's output copy.
    """

    def __init__(self, root: Path, layout: ShardLayout, args: dict[str, Any], dtype: torch.dtype | None):
        self.root, self.layout, self.args, self.dtype = root, layout, args, dtype
        self._stage = 0
        self._shards: dict[tuple[int, int], dict[str, torch.Tensor]] = {pair: {} for pair in layout.files}
        self._embedding: torch.Tensor | None = None

    def _stage_of(self, unit: dict[str, torch.Tensor]) -> int:
        pp = self.layout.pipeline_model_parallel_size
        index = next((i for i in map(_layer_index, unit) if i is not None), None)
        if index is not None:
            return next(p for p in range(pp) if index in self.layout.stage_layers(p))
        return 0 if EMBEDDING in unit else pp - 1

    def add(self, unit: dict[str, torch.Tensor]) -> None:
        if self.dtype is not None:
            unit = {k: v.to(self.dtype) for k, v in unit.items()}
        stage = self._stage_of(unit)
        while self._stage < stage:
            self._write_stage()
        layout = self.layout
        if EMBEDDING in unit and layout.tied_embeddings and layout.pipeline_model_parallel_size > 1:
            self._embedding = unit[EMBEDDING]
        if FINAL_NORM in unit:
            if self._embedding is not None:
                unit = {**unit, EMBEDDING: self._embedding}  # source of the last stage's output-layer copy
        else:
            # shard_state_dict adds the tied output copy to whatever it shards for the last stage;
            # only the final unit should carry it.
            layout = replace(layout, tied_embeddings=False)
        for (tp_rank, ep_rank), shard in self._shards.items():
            shard.update(shard_state_dict(unit, layout, tp_rank, stage, ep_rank=ep_rank))

    def _write_stage(self) -> None:
        pp, ep = self.layout.pipeline_model_parallel_size, self.layout.expert_model_parallel_size
        for (tp_rank, ep_rank), shard in self._shards.items():
            state = {"model": shard, "args": self.args, "iteration": CONVERTED_ITERATION,
                     "checkpoint_version": CHECKPOINT_VERSION}
            write_rank_state(self.root, CONVERTED_ITERATION, tp_rank, self._stage, pp, state, ep_rank, ep)
        log.info("wrote pipeline stage %d/%d", self._stage + 1, pp)
        self._shards = {pair: {} for pair in self._shards}
        self._stage += 1

    def close(self) -> None:
        while self._stage < self.layout.pipeline_model_parallel_size:
            self._write_stage()
        publish(self.root, CONVERTED_ITERATION)
