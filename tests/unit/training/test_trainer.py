"""Data that cannot serve the flags is said before training: no validation pairs for --eval-interval, a global
batch larger than the training split."""

from __future__ import annotations

import pytest

from engine.arguments import TrainingConfig
from engine.training.trainer import check_data_fits


def test_eval_interval_without_validation_pairs_is_an_error():
    with pytest.raises(ValueError) as err:
        check_data_fits(48, 0, TrainingConfig(global_batch_size=8, train_iters=10, eval_interval=5), "100,0,0")
    assert str(err.value) == ("--eval-interval 5: --split 100,0,0 leaves no validation pairs to evaluate on; give the "
                              "split a validation part (e.g. --split 98,2,0) or drop --eval-interval")
    assert check_data_fits(48, 2, TrainingConfig(global_batch_size=8, train_iters=10, eval_interval=5), "96,4,0") is None


def test_a_global_batch_larger_than_the_data_says_how_many_epochs():
    warning = check_data_fits(19, 0, TrainingConfig(global_batch_size=64, train_iters=10), "100,0,0")
    assert warning == ("the training split holds 19 pairs, fewer than --global-batch-size 64: every step repeats pairs "
                       "(3.4 epochs per step, 33.7 epochs over --train-iters 10); lower --global-batch-size or add pairs")
    assert check_data_fits(64, 0, TrainingConfig(global_batch_size=64, train_iters=10), "100,0,0") is None
