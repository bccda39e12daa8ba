"""Crash-safe checkpoint publishing, the save-dir lock, exit conditions, non-finite guards, metrics on resume."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal

import pytest
import torch

from engine.checkpoint.layout import (
    incomplete_checkpoints,
    load_rank_state,
    publish,
    read_tracker,
    staging_dir,
    write_rank_state,
)
from tests.distributed.harness import run_ranks

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
        "--make-vocab-size-divisible-by 8 --swiglu --disable-bias-linear --train-iters 10").split()


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    write_rank_state(tmp_path, 1, 0, 0, 1, {"iteration": 1})
    publish(tmp_path, 1)
    # Killed while ranks were writing iteration 2: nothing was published.
    write_rank_state(tmp_path, 2, 0, 0, 1, {"iteration": 2})
    assert read_tracker(tmp_path) == 1
    assert load_rank_state(tmp_path, 1, 0, 0, 1)["iteration"] == 1
    assert incomplete_checkpoints(tmp_path) == [staging_dir(tmp_path, 2)]
    # Killed between the directory rename and the tracker update: the tracker still names iteration 1.
    os.replace(staging_dir(tmp_path, 2), tmp_path / "iter_0000002")
    assert read_tracker(tmp_path) == 1
    # Saving iteration 2 again replaces the unpublished directory cleanly.
    write_rank_state(tmp_path, 2, 0, 0, 1, {"iteration": 2, "again": True})
    publish(tmp_path, 2)
    assert read_tracker(tmp_path) == 2 and load_rank_state(tmp_path, 2, 0, 0, 1)["again"]
    assert incomplete_checkpoints(tmp_path) == []


def _lock_while_held(save_dir: str) -> str:
    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed
    from engine.training.run_lock import SaveDirLock, SaveDirLockedError

    initialize_distributed(ParallelConfig())
    try:
        SaveDirLock(save_dir).acquire()
    except SaveDirLockedError as err:
        return str(err)
    return "acquired"


def test_a_second_run_cannot_take_the_save_directory(tmp_path):
    with open(tmp_path / ".engine.lock", "w") as holder:
        holder.write("pid 4242 on trainer-0 since today")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = run_ranks(_lock_while_held, 1, str(tmp_path))[0]
    assert "is in use by another run (pid 4242 on trainer-0 since today)" in message
    assert run_ranks(_lock_while_held, 1, str(tmp_path))[0] == "acquired"  # free once the holder is gone


def _exit_reasons() -> list:
    from engine.arguments import ParallelConfig, TrainingConfig
    from engine.initialize import initialize_distributed
    from engine.training.exit_conditions import ExitConditions

    initialize_distributed(ParallelConfig())
    reasons = [ExitConditions(TrainingConfig(exit_interval=3)).check(i) for i in (2, 3)]
    reasons.append(ExitConditions(TrainingConfig(exit_duration_in_mins=1e-9)).check(1))
    handler = ExitConditions(TrainingConfig(exit_signal_handler=True))
    reasons.append(handler.check(1))
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the process lives on and stops at the boundary
    reasons.append(handler.check(2))
    handler.close()
    return reasons


def test_exit_conditions():
    assert run_ranks(_exit_reasons, 1)[0] == [None, "exit interval", "exit duration", None, "signal"]


def _guarded_steps():
    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_trainable_model
    from engine.training.optimizer import build_optimizer
    from engine.training.step import guarded_optimizer_step

    config = parse_args(TINY, world_size=1)
    platform = initialize_distributed(config.parallel)
    set_random_seeds(1)
    model = build_trainable_model(config, platform)
    optimizer = build_optimizer(config, model)
    params = [p for p in model[0].parameters()]
    before = [p.detach().clone() for p in params]

    def set_grads(value):
        for p in params:
            p.main_grad.fill_(0.01)
        params[0].main_grad[0] = value

    set_grads(float("nan"))
    nan_step = guarded_optimizer_step(optimizer, loss_is_finite=True)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, params))
    set_grads(0.01)
    bad_loss_step = guarded_optimizer_step(optimizer, loss_is_finite=False)
    still_unchanged = all(torch.equal(a, p) for a, p in zip(before, params))
    good_step = guarded_optimizer_step(optimizer, loss_is_finite=True)
    changed = all(torch.isfinite(p).all() for p in params) and not torch.equal(before[1], params[1])
    return nan_step, unchanged, bad_loss_step, still_unchanged, good_step, changed


def test_non_finite_loss_or_grad_norm_skips_the_update():
    nan_step, unchanged, bad_loss_step, still_unchanged, good_step, changed = run_ranks(_guarded_steps, 1)[0]
    assert nan_step[0] is False and math.isnan(nan_step[1]) and unchanged
    assert bad_loss_step[0] is False and math.isfinite(bad_loss_step[1]) and still_unchanged
    assert good_step[0] is True and changed


def test_metrics_of_steps_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    from engine.training.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"split": "train", "iteration": i, "loss": 1.0 / i}) + "\n" for i in range(1, 7)))
    logger = MetricsLogger(str(tmp_path), None, enabled=True, start_iteration=4)
    logger.log(5, {"loss": 0.5})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 0.5
