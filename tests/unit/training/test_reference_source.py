"""Which checkpoint a run's reference loads: on resume the recorded one, never the trained weights."""

from __future__ import annotations

import pytest

from engine.arguments import parse_args
from engine.checkpoint.layout import CheckpointError
from engine.training.reference import ReferenceSource, reference_source

TINY = "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 100".split()


def _config(load, extra: str = ""):
    return parse_args([*TINY, "--load", str(load), *extra.split()], world_size=1)


@pytest.fixture
def run_dir(tmp_path):
    """A run saved into its own directory at iterations 1 and 2 (trained weights), started from `converted`."""
    for iteration in (1, 2):
        (tmp_path / "run" / f"iter_{iteration:07d}").mkdir(parents=True)
    (tmp_path / "converted" / "iter_0000001").mkdir(parents=True)
    return tmp_path


def test_a_resume_takes_the_recorded_reference_not_the_runs_own_iteration_1(run_dir):
    record = {"root": str(run_dir / "converted"), "iteration": 1}
    source = reference_source(_config(run_dir / "run"), 2, record, resuming=True)
    assert source == ReferenceSource(str(run_dir / "converted"), 1)


def test_explicit_flags_and_unrecorded_checkpoints_take_refer_model_iter_of_load_or_ref_model(run_dir):
    record = {"root": str(run_dir / "converted"), "iteration": 1}
    explicit = reference_source(_config(run_dir / "run", "--refer-model-iter 2"), 2, record, resuming=True)
    assert explicit == ReferenceSource(str(run_dir / "run"), 2)
    other = reference_source(_config(run_dir / "run", f"--ref-model {run_dir / 'converted'}"), 2, record, True)
    assert other == ReferenceSource(str(run_dir / "converted"), 1)
    unrecorded = reference_source(_config(run_dir / "run"), 2, None, resuming=True)
    assert unrecorded == ReferenceSource(str(run_dir / "run"), 1)
    with pytest.raises(CheckpointError, match=r"iter_0000005 does not exist; set --ref-model"):
        reference_source(_config(run_dir / "run", "--refer-model-iter 5"), 2, record, resuming=True)


def test_a_fresh_start_takes_the_loaded_policy_and_reference_free_runs_none(run_dir):
    assert reference_source(_config(run_dir / "converted"), 1, None, False) == \
        ReferenceSource(str(run_dir / "converted"), 1)
    assert reference_source(_config(run_dir / "converted", "--stage simpo"), 1, None, False) is None
