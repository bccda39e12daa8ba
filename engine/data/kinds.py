"""The training data of a stage, behind one interface: pairwise (dpo, simpo, orpo, cpo) or unpaired (kto).

A stage's traits name its kind (engine/loss_catalog.py `StageTraits.data`); the trainer builds the
kind once and asks it for the data sets, the sampler, the collated micro-batches and the sequence
lengths it counts throughput by, never which stage runs.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from engine.arguments import EngineConfig
from engine.data.collate import PairBatch, collate_pairs, pack_pairs
from engine.data.dataset import build_pairwise_datasets
from engine.data.sampler import PairwiseBatchSampler
from engine.data.unpaired import BlockBatchSampler, MismatchedPairs, UnpairedDataset, collate_unpaired


class PairwiseData:
    """Pairs (prompt, chosen, rejected); a micro-batch is `[chosen x n ; rejected x n]`."""

    sampler_class = PairwiseBatchSampler

    def __init__(self, config: EngineConfig):
        self.config = config

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
        return (pack_pairs if self.config.data.pack_sequences else collate_pairs)(samples, pad_to_multiple_of)

    @staticmethod
    def sequence_lengths(sample: dict) -> list[int]:
        """The sequences of one sample the policy trains on."""
        return [len(sample["chosen_input_ids"]), len(sample["rejected_input_ids"])]


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
        return collate_unpaired(samples, pad_to_multiple_of, self.config.data.pack_sequences)

    @staticmethod
    def sequence_lengths(sample: dict) -> list[int]:
        return [len(sample["chosen_input_ids"])]


DATA_KINDS = {"pairwise": PairwiseData, "unpaired": UnpairedData}


def build_stage_data(config: EngineConfig) -> PairwiseData:
    return DATA_KINDS[config.preference.traits.data](config)
