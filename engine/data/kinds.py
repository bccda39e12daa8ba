"""The training data of a stage, behind one interface: pairwise (dpo, simpo, orpo, cpo, rm) or unpaired (kto).

A stage's traits name its kind (engine/loss_catalog.py `StageTraits.data`); the trainer builds the
kind once and asks it for the data sets, the sampler, the micro-batches (regrouped under
--max-tokens-per-micro-batch) and their collation, and the sequence lengths it counts throughput by,
never which stage runs.
"""

from __future__ import annotations

import itertools

from torch.utils.data import Dataset

from engine.arguments import EngineConfig
from engine.data.collate import PairBatch, collate_pairs, pack_pairs, shared_prefix_length
from engine.data.dataset import build_pairwise_datasets
from engine.data.sampler import PairwiseBatchSampler, token_budget_micro_batches
from engine.data.unpaired import BlockBatchSampler, MismatchedPairs, UnpairedDataset, collate_unpaired
from engine.formats import IGNORE_INDEX


def _sequence_shards(config: EngineConfig) -> int:
    """How many sequence-parallel shards a micro-batch's positions split into (each TP rank's `OutputRows`)."""
    par = config.parallel
    return par.tensor_model_parallel_size if par.sequence_parallel else 1


class PairwiseData:
    """Pairs (prompt, chosen, rejected); a micro-batch is `[chosen x n ; rejected x n]`."""

    sampler_class = PairwiseBatchSampler

    def __init__(self, config: EngineConfig):
        self.config = config
        self.output_rows = not config.preference.traits.value_head
        """Whether the last projection runs on the batches' `OutputRows` (labelled positions) only; a reward
        model's value head runs on every position (`RewardObjective.output_rows`)."""
        self.prompt_targets = bool(config.preference.orpo_prompt_loss)
        """ORPO's prompt loss: every position up to the last answer one predicts a target."""

    def build_datasets(self) -> dict[str, Dataset | None]:
        config = self.config
        return build_pairwise_datasets(config.data, config.model.seq_length, config.model.vocab_size,
                                       config.training.seed)

    def sampler(self, num_samples: int, consumed: int, data_parallel_rank: int, data_parallel_size: int,
                shuffle: bool):
        train = self.config.training
        return self.sampler_class(num_samples, train.global_batch_size, train.micro_batch_size, data_parallel_rank,
                                  data_parallel_size, train.seed, consumed_samples=consumed, shuffle=shuffle)

    def collate(self, samples: list[dict], pad_to_multiple_of: int) -> PairBatch:
        data = self.config.data
        collate = pack_pairs if data.pack_sequences else collate_pairs
        return collate(samples, pad_to_multiple_of, shards=_sequence_shards(self.config),
                       prompt_targets=self.prompt_targets, shared_prompt=data.shared_prompt)

    def rows(self, sample: dict) -> tuple[int, ...]:
        """The lengths of the rows a pair collates into: chosen and rejected, or one shared-prompt row."""
        chosen, rejected = sample["chosen_input_ids"], sample["rejected_input_ids"]
        if self.config.data.shared_prompt:
            return (chosen.size + rejected.size - shared_prefix_length(chosen, rejected),)
        return chosen.size, rejected.size

    def regroup(self, indices: list[list[int]], samples: list[list[dict]],
                pad_to_multiple_of: int) -> tuple[list[list[int]], list[list[dict]]]:
        """The micro-batches' sample indices and samples: as sampled, or under --max-tokens-per-micro-batch the
        same samples, in the same order, regrouped by their tokens."""
        budget = self.config.training.max_tokens_per_micro_batch
        if budget is None:
            return indices, samples
        flat, pairs = [i for micro in indices for i in micro], [s for micro in samples for s in micro]
        par = self.config.parallel
        interleaved = par.num_layers_per_virtual_pipeline_stage is not None
        sizes = token_budget_micro_batches([self.rows(s) for s in pairs], budget, pad_to_multiple_of,
                                           self.config.data.pack_sequences,
                                           par.pipeline_model_parallel_size if interleaved else 1)
        bounds = list(itertools.accumulate(sizes, initial=0))
        return ([flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                [pairs[a:b] for a, b in zip(bounds[:-1], bounds[1:])])

    def output_positions(self, labels) -> int:
        """How many positions of a sequence with these labels the last projection runs on."""
        if not self.output_rows:
            return len(labels)
        if self.prompt_targets:  # every position but the last predicts a target
            return len(labels) - 1
        return int((labels[1:] != IGNORE_INDEX).sum())

    def sequence_lengths(self, sample: dict) -> list[tuple[int, int]]:
        """For each sequence of one sample the policy trains on: the tokens it runs (under --shared-prompt the
        rejected one's without the shared prefix: FLOPs as a sequence of its own, leaving out its attention to
        the prefix) and the positions the last projection runs on."""
        lengths = [(len(sample[f"{side}_input_ids"]), self.output_positions(sample[f"{side}_labels"]))
                   for side in ("chosen", "rejected")]
        if self.config.data.shared_prompt:
            (chosen, _), (_, outputs) = lengths
            lengths[1] = (self.rows(sample)[0] - chosen, outputs)
        return lengths


class UnpairedData(PairwiseData):
    """Unpaired samples with their KL completion (`MismatchedPairs`), one block per micro-batch."""

    sampler_class = BlockBatchSampler

    def build_datasets(self) -> dict[str, Dataset | None]:
        config = self.config
        splits = build_pairwise_datasets(config.data, config.model.seq_length, config.model.vocab_size,
                                         config.training.seed, reader=UnpairedDataset)
        return {name: None if dataset is None else
                MismatchedPairs(dataset, config.training.micro_batch_size, config.model.seq_length,
                                config.training.seed)
                for name, dataset in splits.items()}

    def collate(self, samples: list[dict], pad_to_multiple_of: int) -> PairBatch:
        return collate_unpaired(samples, pad_to_multiple_of, self.config.data.pack_sequences,
                                shards=_sequence_shards(self.config))

    def sequence_lengths(self, sample: dict) -> list[tuple[int, int]]:
        """The sample's own completion (its KL completion runs without gradient, like the reference)."""
        return [(len(sample["chosen_input_ids"]), self.output_positions(sample["chosen_labels"]))]


DATA_KINDS = {"pairwise": PairwiseData, "unpaired": UnpairedData}


def build_stage_data(config: EngineConfig) -> PairwiseData:
    return DATA_KINDS[config.preference.traits.data](config)
