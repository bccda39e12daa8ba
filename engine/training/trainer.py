"""The DPO trainer: one class whose methods read as the training story.

build (distributed, data, policy, reference, optimizer, checkpoint state) ->
train (per global batch: collate micro-batches, reference log-probs, policy
forward/backward through megatron's schedules, optimizer step, log, evaluate,
save) -> close.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch.utils.data import Dataset

from engine.arguments import EngineConfig, TrainingConfig, check_inputs
from engine.checkpoint.layout import iteration_dir_name
from engine.data.kinds import PairwiseData, build_stage_data
from engine.dpo.objective import PairwiseObjective
from engine.dpo.stages import build_objective
from engine.initialize import destroy_distributed, initialize_distributed, set_random_seeds
from engine.model.lora import parameter_counts
from engine.model.provider import build_trainable_model, fixed_seq_length
from engine.platform import Platform, current_device
from engine.training.checkpointing import Checkpointer, TrainState
from engine.training.exit_conditions import ExitConditions
from engine.training.metrics import MetricsLogger, detect_peak_tflops, forward_flops
from engine.training.optimizer import build_optimizer, build_scheduler
from engine.training.reference import Reference, ReferencePolicy, ReferenceSource, build_reference, reference_source
from engine.training.run_lock import SaveDirLock
from engine.training.step import chunk_iterators, forward_only, prepare_model_config, reduce_metrics, train_step

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite steps: continuing would train on garbage."""


def check_data_fits(train_pairs: int, valid_pairs: int, train: TrainingConfig, split: str) -> str | None:
    """Refuses --eval-interval without validation pairs (evaluation would silently never run); returns a
    warning when a global batch holds more pairs than the training split, which the sampler allows by
    repeating pairs within the batch."""
    if train.eval_interval and not valid_pairs:
        raise ValueError(f"--eval-interval {train.eval_interval}: --split {split} leaves no validation pairs to "
                         "evaluate on; give the split a validation part (e.g. --split 98,2,0) or drop --eval-interval")
    if train.global_batch_size <= train_pairs:
        return None
    return (f"the training split holds {train_pairs} pairs, fewer than --global-batch-size {train.global_batch_size}: "
            f"every step repeats pairs ({train.global_batch_size / train_pairs:.1f} epochs per step, "
            f"{train.train_iters * train.global_batch_size / train_pairs:.1f} epochs over --train-iters "
            f"{train.train_iters}); lower --global-batch-size or add pairs")


class DPOTrainer:
    """The run: built from the config, then `train()`, then `close()`; its own checkpointed state is
    `state` (iteration, consumed pairs) and `state_dict()` (the objective's, the reference's source)."""

    config: EngineConfig
    platform: Platform
    save_lock: SaveDirLock | None
    data: PairwiseData
    """The stage's kind of data (pairwise, or unpaired for KTO): data sets, sampler, collate."""
    datasets: dict[str, Dataset | None]
    num_microbatches: int
    """Micro-batches per global batch on each data-parallel rank (without --max-tokens-per-micro-batch)."""
    objective: PairwiseObjective
    checkpointer: Checkpointer
    model: list[torch.nn.Module]
    reference_source: ReferenceSource | None
    reference: Reference
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    state: TrainState
    metrics: MetricsLogger
    exit_conditions: ExitConditions
    skipped_in_a_row: int
    """Consecutive updates skipped for a non-finite loss or gradient norm (--max-skipped-iters)."""
    peak_tflops: float | None

    def __init__(self, config: EngineConfig):
        self.config = config
        check_inputs(config)
        self.platform = initialize_distributed(config.parallel, config.virtual_pipeline_size,
                                               config.training.deterministic_mode)
        self.save_lock = SaveDirLock(config.checkpoint.save) if config.checkpoint.save else None
        if self.save_lock is not None:
            self.save_lock.acquire()
        set_random_seeds(config.training.seed)
        train = config.training
        self.num_microbatches = train.global_batch_size // (train.micro_batch_size * self._dp_size)
        self.data = build_stage_data(config)
        self.datasets = self.data.build_datasets()
        if self.datasets["train"] is None:
            raise ValueError(f"--split {config.data.split} leaves no training pairs")
        warning = check_data_fits(len(self.datasets["train"]), len(self.datasets["valid"] or []), train,
                                  config.data.split)
        if warning and dist.get_rank() == 0:
            logger.warning(warning)
        self.objective = build_objective(config.preference, config.model.vocab_size or config.padded_vocab_size,
                                         half_precision=config.precision.bf16 or config.precision.fp16)
        self.checkpointer = Checkpointer(config)
        self.model = build_trainable_model(config, self.platform)
        self._log_parameters()
        loaded_iteration, rank_state = self.checkpointer.load_policy(self.model)
        resuming = not config.checkpoint.finetune and "opt_param_scheduler" in rank_state
        self.reference_source = reference_source(config, loaded_iteration, rank_state.get("reference"), resuming)
        self.reference = build_reference(
            config, self.reference_source, self.model, self.objective, self.platform,
            {"train": self.datasets["train"], "valid": self.datasets["valid"]}, self._collate,
        )
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        prepare_model_config(self.model, self.optimizer)
        self.state = TrainState()
        if resuming:
            self.state = self.checkpointer.restore_training_state(
                loaded_iteration, rank_state, self.optimizer, self.scheduler
            )
            self.load_state_dict(rank_state)
        self.metrics = MetricsLogger(config.checkpoint.save, config.logging.tensorboard_dir, dist.get_rank() == 0,
                                     start_iteration=self.state.iteration)
        self.exit_conditions = ExitConditions(train)
        self.skipped_in_a_row = 0
        self.peak_tflops = detect_peak_tflops(config.logging.peak_tflops)
        self._log_start(loaded_iteration, resuming)

    @property
    def _dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def _dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def state_dict(self) -> dict:
        """What a checkpoint holds of the run beside the model, optimizer, scheduler, RNG and `state`:
        the objective's state and where the reference came from (a resume keeps that reference)."""
        return {"objective": self.objective.state_dict(),
                **({"reference": self.reference_source.record()} if self.reference_source else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` from a checkpoint's rank file (the reference's record was read at build)."""
        self.objective.load_state_dict(state.get("objective", {}))

    def _log_parameters(self) -> None:
        trainable, total = parameter_counts(self.model)
        if dist.get_rank() == 0:
            logger.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100.0 * trainable / total)

    def _log_start(self, loaded_iteration: int, resuming: bool) -> None:
        if dist.get_rank() != 0:
            return
        pref, train, source = self.config.preference, self.config.training, self.reference_source
        pairs = len(self.datasets["train"])
        budget = train.max_tokens_per_micro_batch
        split = (f"micro-batches of up to {budget} tokens" if budget is not None
                 else f"{self.num_microbatches} micro-batches x {train.micro_batch_size}")
        logger.info(
            "objective %s | policy %s iteration %d (%s) | reference %s | %d train pairs, "
            "global batch %d = %s x DP %d, --train-iters %d = %.1f epochs",
            pref.describe(), self.config.checkpoint.load, loaded_iteration, "resumed" if resuming else "fresh start",
            (f"{source.root} iteration {source.iteration}"
             + (" (cached log-probs: no reference model)" if self.reference.forward_passes == 0 else ""))
            if source else "none", pairs, train.global_batch_size, split, self._dp_size, train.train_iters,
            train.train_iters * train.global_batch_size / pairs,
        )

    # -- data ---------------------------------------------------------------------------------------------
    def _sampler(self, split: str, consumed: int):
        return self.data.sampler(len(self.datasets[split]), consumed, self._dp_rank, self._dp_size,
                                 shuffle=split == "train")

    def _pad_multiple(self) -> int:
        """Rows are padded to a multiple of this: 8 (and TP under sequence parallel); under the allgather MoE
        dispatcher a multiple of --seq-length too, so every micro-batch has one length (sequences are
        truncated to --seq-length)."""
        tp = self.config.parallel.tensor_model_parallel_size
        multiple = math.lcm(8, tp) if self.config.parallel.sequence_parallel else 8
        return math.lcm(multiple, self.config.model.seq_length) if fixed_seq_length(self.config) else multiple

    def _collate(self, split: str, pair_indices: list[int]):
        return self._batch([self.datasets[split][i] for i in pair_indices], pair_indices)

    def _batch(self, samples: list[dict], pair_indices: list[int]):
        batch = self.data.collate(samples, self._pad_multiple())
        batch.pair_indices = pair_indices  # what the reference cache looks values up by
        return batch.to(current_device())

    def _micro_batches(self, split: str, indices: list[list[int]]) -> tuple[list, list[tuple[int, int]]]:
        """Collated micro-batches of this DP rank (with the global batch's counts the objective needs),
        and for every sequence in them its unpadded length and the positions its last projection runs on."""
        dataset = self.datasets[split]
        samples = [[dataset[i] for i in micro] for micro in indices]
        indices, samples = self.data.regroup(indices, samples, self._pad_multiple())
        lengths = [n for micro in samples for s in micro for n in self.data.sequence_lengths(s)]
        micro_batches = [self._batch(micro, ids) for micro, ids in zip(samples, indices)]
        self.objective.share_global_counts(micro_batches, parallel_state.get_data_parallel_group())
        return micro_batches, lengths

    def _with_reference(self, micro_batches: list, split: str) -> list:
        return list(zip(micro_batches, self.reference.logps(micro_batches, split)))

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        train, ckpt = self.config.training, self.config.checkpoint
        if self.state.iteration >= train.train_iters:
            if dist.get_rank() == 0:
                logger.warning("nothing to train: the checkpoint is at iteration %d, --train-iters is %d; no checkpoint "
                               "written (raise --train-iters to train further)", self.state.iteration, train.train_iters)
            return self.state
        batches = iter(self._sampler("train", self.state.consumed_train_samples))
        self.platform.reset_peak_memory()  # the first interval's peak is its steps', not the build's
        while self.state.iteration < train.train_iters:
            # The clock brackets the step's device work: kernels are queued asynchronously, so without a
            # synchronization the time would be the host's, and the next step would pay for this one's.
            self.platform.synchronize()
            start = time.perf_counter()
            indices = next(batches)
            micro_batches, lengths = self._micro_batches("train", indices)
            items = self._with_reference(micro_batches, "train")
            if self.objective.needs_current_logps:
                self._before_step(micro_batches, items)
            result = train_step(
                self.objective.policy_forward_step, chunk_iterators(items, self.model), self.model, self.optimizer,
                self.scheduler, len(micro_batches), train.micro_batch_size,
                max(b.tokens.shape[1] for b in micro_batches), self.objective.metric_names,
            )
            self.state.iteration += 1
            self.state.consumed_train_samples += train.global_batch_size
            self._account_for_skips(result, indices)
            self.platform.synchronize()
            elapsed = time.perf_counter() - start
            if self.state.iteration % self.config.logging.log_interval == 0:
                self.metrics.log(self.state.iteration, self._step_scalars(result, lengths, elapsed))
                self.platform.reset_peak_memory()
            if train.eval_interval and self.state.iteration % train.eval_interval == 0:
                self.evaluate()
            saved = self.checkpointer.interval_due(self.state.iteration)
            if saved:
                self.save()
            reason = self.exit_conditions.check(self.state.iteration)
            if reason is not None:
                if ckpt.save is not None and not saved:
                    self.save()
                logger.info("stopping after iteration %d: %s", self.state.iteration, reason)
                return self.state
        if ckpt.save is not None and not self.checkpointer.interval_due(self.state.iteration):
            self.save()
        return self.state

    def _before_step(self, micro_batches: list, items: list) -> None:
        """The policy's log-probs of the batch before its update (the forward-only pass a reference runs,
        on the policy's weights), for an objective whose loss reads them (BCO's reward shift)."""
        current = ReferencePolicy(self.model, self.objective).logps(micro_batches)
        self.objective.before_step(items, current, (parallel_state.get_data_parallel_group(),
                                                    parallel_state.get_pipeline_model_parallel_group()))

    def _account_for_skips(self, result, indices: list[list[int]]) -> None:
        """Counts updates skipped for non-finite values, names the pairs involved, and stops a run
        that keeps diverging (--max-skipped-iters in a row)."""
        if not result.skipped_nonfinite:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        self.state.skipped_iterations += 1
        pairs = [None] * self._dp_size
        dist.all_gather_object(pairs, [i for micro in indices for i in micro],
                               group=parallel_state.get_data_parallel_group())
        if dist.get_rank() == 0:
            logger.warning(
                "iteration %d: update skipped, loss %s, grad norm %s (%d in a row, %d in this run); "
                "train pairs of the batch: %s", self.state.iteration, result.metrics.get("loss"),
                result.grad_norm, self.skipped_in_a_row, self.state.skipped_iterations,
                sorted(i for rank in pairs for i in rank),
            )
        if self.skipped_in_a_row >= self.config.training.max_skipped_iters:
            raise TrainingDivergedError(
                f"{self.skipped_in_a_row} consecutive updates skipped for a non-finite loss or gradient norm "
                f"(--max-skipped-iters {self.config.training.max_skipped_iters}); last good weights are those "
                f"of iteration {self.state.iteration - self.skipped_in_a_row}: lower --lr, check the data "
                "pairs named above, or resume from the last checkpoint"
            )

    def _step_scalars(self, result, lengths: list[tuple[int, int]], elapsed: float) -> dict[str, float]:
        """The logged step: its metrics, and `step_time_s` (`elapsed`, between device synchronizations) with the
        throughput derived from it. `peak_memory_gib` is, on CUDA, the peak allocated since the previous log
        line (reset every --log-interval, so it covers the interval's steps and any evaluation or save in
        it); on CPU it is the process's peak RSS since it started, which cannot be reset."""
        tokens, flops = self._global_work(lengths)
        world = dist.get_world_size()
        scalars = {"consumed_pairs": self.state.consumed_train_samples, **result.metrics,
                   "grad_norm": result.grad_norm, "lr": result.learning_rate,
                   "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                   "tflops_per_device": flops / elapsed / world / 1e12,
                   "peak_memory_gib": self.platform.peak_memory_bytes() / 2**30}
        if self.peak_tflops is not None:
            scalars["mfu"] = scalars["tflops_per_device"] / self.peak_tflops
        if not result.update_successful:
            scalars["skipped_update"] = 1
        return scalars

    def _global_work(self, lengths: list[tuple[int, int]]) -> tuple[float, float]:
        """Real (unpadded) tokens and model FLOPs of this global batch, summed over DP ranks."""
        # The policy's forward + backward (3 forwards), plus one for a reference model run online and
        # one for the policy's forward-only pass of BCO's reward shift.
        passes = 3 + self.reference.forward_passes
        passes += 1 if self.objective.needs_current_logps else 0
        # The last projection: the vocab, or a reward model's single value per position.
        width = 1 if self.config.preference.traits.value_head else self.config.padded_vocab_size
        flops = sum(passes * forward_flops(self.config.model, width, n, outputs, self.config.moe)
                    for n, outputs in lengths)
        totals = torch.tensor([float(sum(n for n, _ in lengths)), flops], dtype=torch.float64,
                              device=current_device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return totals[0].item(), totals[1].item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.datasets["valid"] is None:
            return None
        train = self.config.training
        batches = iter(self._sampler("valid", 0))
        for chunk in self.model:
            chunk.eval()
        collected = []
        for _ in range(train.eval_iters):
            micro_batches = self._micro_batches("valid", next(batches))[0]
            items = self._with_reference(micro_batches, "valid")
            if self.objective.current_logps_in_eval:
                self._before_step(micro_batches, items)
            collected += forward_only(self.objective.policy_forward_step, items, self.model)
        for chunk in self.model:
            chunk.train()
        scalars = reduce_metrics(collected, self.objective.metric_names)
        self.metrics.log(self.state.iteration, scalars, split="valid")
        return scalars

    def save(self) -> None:
        source = self.reference_source
        if source is not None and source.iteration == self.state.iteration and \
                Path(source.root).resolve() == Path(self.config.checkpoint.save).resolve():
            # Training inside the converted checkpoint's directory: iteration 1 there is the reference.
            logger.warning("not saving iteration %d: it would replace the reference checkpoint %s",
                           self.state.iteration, Path(source.root) / iteration_dir_name(source.iteration))
            return
        self.checkpointer.save(self.state.iteration, self.model, self.optimizer, self.scheduler, self.state,
                               extra=self.state_dict())

    def close(self) -> None:
        self.metrics.close()
        self.exit_conditions.close()
        if self.save_lock is not None:
            self.save_lock.release()
        destroy_distributed()
