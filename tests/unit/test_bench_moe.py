"""benchmarks/bench_moe.py builds its pairs with bench_dpo.py's generator: the two scripts' arguments must agree
(a flag bench_dpo.py's data builder reads that bench_moe.py lacks broke the MoE benchmark once)."""

import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from engine.formats import OUTPUT_KEYS, output_path_prefix

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_moe  # noqa: E402


@pytest.mark.parametrize("shape", ["short-prompt", "long-prompt"])
def test_the_moe_benchmark_builds_its_pairs(shape, tmp_path):
    args = bench_moe.build_parser().parse_args(["--pairs", "4", "--max-answer", "20", "--data-shape", shape])
    prefix = bench_moe.build_data(tmp_path, args)
    chosen = IndexedDataset(output_path_prefix(prefix, "chosen_input_ids"))
    assert len(chosen) == 4 and all(len(IndexedDataset(output_path_prefix(prefix, key))) == 4 for key in OUTPUT_KEYS)
    assert max(chosen.sequence_lengths) <= (32 if shape == "short-prompt" else 60) + 20
