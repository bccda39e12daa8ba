"""The reference policy: log-probs of every micro-batch before the policy's step.

Three sources behind one protocol (`Reference`): a frozen copy of the policy's model
(`ReferencePolicy`), the policy's own chunks with LoRA adapters off (`AdapterOffReference`),
or a table precomputed by one of those (`CachedReference`, engine/training/reference_cache.py).
A live source runs the same forward code as the policy (same model builder, same
`PairwiseObjective.sequence_logps`) through a forward-only pipeline pass, so with the
reference equal to the initial policy the first DPO loss is exactly ln 2. The results land
on the last pipeline stage, where the policy's loss needs them. `build_reference` picks the
source from the flags; the trainer only calls `logps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import torch
from megatron.core import parallel_state

from engine.arguments import EngineConfig
from engine.checkpoint.layout import CheckpointError, iteration_dir_name, read_tracker
from engine.dpo.objective import PairwiseObjective
from engine.model.lora import adapters_disabled
from engine.model.provider import build_frozen_model
from engine.platform import Platform
from engine.training import reference_cache
from engine.training.checkpointing import load_model_weights
from engine.training.step import forward_only


class Reference(Protocol):
    forward_passes: int
    """Model forward passes it runs per training step (for FLOP counts): 1 live, 0 cached."""

    def logps(self, micro_batches: list, split: str | None = None) -> list[torch.Tensor | None]:
        """Per micro-batch a packed `SequenceLogps` ([2 or 3, rows]) on the last pipeline stage, None elsewhere."""


@dataclass(frozen=True)
class ReferenceSource:
    """Which checkpoint the reference policy is loaded from (recorded in every saved checkpoint)."""

    root: str
    iteration: int

    def record(self) -> dict:
        return {"root": str(Path(self.root).resolve()), "iteration": self.iteration}


class NoReference:
    """The reference of a reference-free objective (simpo, orpo, cpo, rm, --reference-free): no model, no pass;
    the objective gets None for every micro-batch."""

    forward_passes = 0

    def logps(self, micro_batches: list, split: str | None = None) -> list[None]:
        return [None] * len(micro_batches)


class ReferencePolicy:
    forward_passes = 1

    def __init__(self, chunks: list[torch.nn.Module], objective: PairwiseObjective):
        self.chunks = chunks
        self.objective = objective

    @torch.no_grad()
    def logps(self, micro_batches: list, split: str | None = None) -> list[torch.Tensor | None]:
        """Per micro-batch a packed `SequenceLogps` on the last pipeline stage: a [2, rows] tensor
        (answer log-prob sum, answer token count), with a third row under --ld-alpha (the sum over
        the pair's shared length); None on other stages."""
        collected = forward_only(self.objective.reference_forward_step, [(b, None) for b in micro_batches],
                                 self.chunks, collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return list(collected)
        return [None] * len(micro_batches)


class AdapterOffReference(ReferencePolicy):
    """LoRA DPO's reference: the policy's own chunks with every adapter off, in eval mode.

    The base weights are frozen, so this is the initial policy without a second copy of
    them; the forward is the policy's code with the adapter branches skipped.
    """

    @torch.no_grad()
    def logps(self, micro_batches: list, split: str | None = None) -> list[torch.Tensor | None]:
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with adapters_disabled(self.chunks):
                return super().logps(micro_batches, split)
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)


def reference_source(config: EngineConfig, loaded_iteration: int, saved_record: dict | None,
                     resuming: bool) -> ReferenceSource | None:
    """Where the reference comes from; None for reference-free objectives (SimPO, ORPO, CPO,
    --reference-free). Under LoRA the base (--load); else the initial policy on a fresh start. On resume
    the reference the checkpoint records (`saved_record`): never the trained weights, even when the run
    saved its own iteration 1 beside them; with --ref-model or --refer-model-iter given, iteration
    --refer-model-iter (default 1) of --ref-model or --load (MindSpeed-LLM's flow, and checkpoints
    without a record)."""
    pref, load = config.preference, config.checkpoint.load
    if not pref.uses_reference:
        return None
    if config.lora.enabled:
        return ReferenceSource(load, read_tracker(load))
    if not resuming:
        if pref.ref_model is not None:
            return ReferenceSource(pref.ref_model, read_tracker(pref.ref_model) or pref.refer_model_iter or 1)
        return ReferenceSource(load, loaded_iteration)
    if pref.ref_model is None and pref.refer_model_iter is None and saved_record is not None:
        return ReferenceSource(saved_record["root"], saved_record["iteration"])
    root, iteration = pref.ref_model or load, pref.refer_model_iter or 1
    if (Path(root) / iteration_dir_name(iteration)).is_dir():
        return ReferenceSource(root, iteration)
    raise CheckpointError(
        f"the reference checkpoint {Path(root) / iteration_dir_name(iteration)} does not exist; "
        "set --ref-model to the initial checkpoint or --refer-model-iter to a saved iteration"
    )


def build_reference(config: EngineConfig, source: ReferenceSource | None, policy: list[torch.nn.Module],
                    objective: PairwiseObjective, platform: Platform, splits: dict,
                    make_batch: Callable) -> Reference:
    """The reference of the run: `NoReference` without a source; adapters off under LoRA (no copy of the frozen
    base); else a frozen copy loaded from `source`; with --precompute-ref-logps, a table that one of
    those fills once (`splits` are the train and valid data sets, `make_batch(split, pair_indices)`
    collates a micro-batch as training does)."""
    if source is None:
        return NoReference()
    if config.lora.enabled:
        live = partial(AdapterOffReference, policy, objective)
    else:
        def live() -> ReferencePolicy:
            chunks = build_frozen_model(config, platform)
            load_model_weights(chunks, source.root, source.iteration, config)
            return ReferencePolicy(chunks, objective)
    if not config.preference.precompute_ref_logps:
        return live()
    prefixes, _ = config.data.prefixes_and_weights
    data_files = [p for prefix in prefixes for p in Path(prefix).parent.glob(Path(prefix).name + "_packed_*")]
    stamp = reference_cache.fingerprint(
        data_files, config.data.split, config.model.seq_length, source.root, source.iteration,
        rows=3 if config.preference.ld_alpha is not None else 2, adapters_off=config.lora.enabled,
    )
    if config.preference.traits.data == "unpaired":  # each sample's KL completion depends on the KL blocks
        stamp["kl_pairing"] = [config.training.micro_batch_size, config.training.seed]
    directory = config.checkpoint.save or Path(prefixes[0]).parent
    return reference_cache.load_or_compute(reference_cache.cache_path(directory, stamp), stamp, splits, live,
                                           config.training.micro_batch_size, make_batch)
