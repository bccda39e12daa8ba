"""The learning-rate schedule on resume (Megatron-LM's --override / --use-checkpoint contract) and warm-up."""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import pytest

from engine.arguments import parse_args
from engine.checkpoint.layout import CheckpointError
from engine.training.optimizer import build_scheduler, restore_scheduler

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
         "--lr 1e-3 --min-lr 0").split()


def scheduler_for(flags: str):
    """The run's scheduler over a stand-in optimizer: the schedule only writes param_groups."""
    config = parse_args([*MODEL, *flags.split()], world_size=1)
    optimizer = SimpleNamespace(param_groups=[{}])
    return build_scheduler(config, optimizer), optimizer, config.training


def lrs_after_resume(saved: dict, flags: str, steps: int) -> list[float]:
    scheduler, optimizer, train = scheduler_for(flags)
    restore_scheduler(scheduler, saved, train)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr the next update uses
        scheduler.step(1)
    return lrs


def saved_after(flags: str, steps: int) -> dict:
    scheduler, _, _ = scheduler_for(flags)
    scheduler.step(steps)
    return scheduler.state_dict()


def test_extending_a_decaying_run_is_refused_by_default_with_both_ways_out():
    saved = saved_after("--train-iters 2 --lr-decay-style cosine", 2)
    with pytest.raises(CheckpointError) as err:
        lrs_after_resume(saved, "--train-iters 5 --lr-decay-style cosine", 3)
    message = str(err.value)
    assert "--train-iters: decay steps 2 -> 5" in message
    assert "--override-opt-param-scheduler" in message and "--use-checkpoint-opt-param-scheduler" in message
    assert "\n" not in message


def test_override_follows_the_flags_from_the_checkpoint_step():
    saved = saved_after("--train-iters 2 --lr-decay-style cosine", 2)
    resumed = lrs_after_resume(saved, "--train-iters 5 --lr-decay-style cosine --override-opt-param-scheduler", 3)
    fresh, optimizer, _ = scheduler_for("--train-iters 5 --lr-decay-style cosine")
    fresh.step(2)
    expected = []
    for _ in range(3):
        expected.append(optimizer.param_groups[0]["lr"])
        fresh.step(1)
    assert resumed == pytest.approx(expected) and all(lr > 0 for lr in resumed)


def test_use_checkpoint_keeps_its_schedule_and_says_the_new_steps_get_min_lr(caplog):
    saved = saved_after("--train-iters 2 --lr-decay-style cosine", 2)
    with caplog.at_level(logging.WARNING):
        lrs = lrs_after_resume(saved, "--train-iters 5 --lr-decay-style cosine --use-checkpoint-opt-param-scheduler",
                               3)
    assert lrs == [0.0, 0.0, 0.0]
    assert "decays over 2 steps, so steps 3-5 train at its min lr 0" in caplog.text


def test_same_schedule_or_unread_values_resume_without_a_flag():
    saved = saved_after("--train-iters 10 --lr-decay-style cosine", 4)
    lr = lrs_after_resume(saved, "--train-iters 10 --lr-decay-style cosine", 1)[0]
    assert lr == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 0.4)))
    # A constant schedule never reads the decay steps: a longer run extends it as it is.
    saved = saved_after("--train-iters 2 --lr-decay-style constant", 2)
    assert lrs_after_resume(saved, "--train-iters 5 --lr-decay-style constant", 3) == [1e-3] * 3


def test_each_changed_flag_is_named():
    saved = saved_after("--train-iters 10 --lr-decay-style linear --lr-warmup-iters 2", 3)
    with pytest.raises(CheckpointError) as err:
        lrs_after_resume(saved, "--train-iters 10 --lr-decay-style cosine --lr 2e-3 --lr-warmup-iters 1", 1)
    for part in ("--lr: peak lr 0.001 -> 0.002", "--lr-warmup-iters: warm-up steps 2 -> 1",
                 "--lr-decay-style: decay style linear -> cosine"):
        assert part in str(err.value)


def test_a_warmup_fraction_worth_less_than_a_step_still_warms_up():
    # 0.1 x 5 steps: Megatron-LM keeps the fraction (it counts samples); int() used to make it 0 steps.
    lrs = lrs_after_resume(saved_after("--train-iters 5 --lr-warmup-fraction 0.1", 0),
                           "--train-iters 5 --lr-warmup-fraction 0.1", 2)
    assert lrs[0] == 0.0 and lrs[1] > 0.0


def test_wsd_holds_the_peak_after_warm_up_then_decays_over_its_last_steps(capsys):
    """Megatron-LM's warm-up / stable / decay: --lr-wsd-decay-iters of the decay steps anneal, the others hold --lr."""
    scheduler, optimizer, _ = scheduler_for("--train-iters 10 --lr-warmup-iters 2 --lr-decay-style WSD "
                                            "--lr-wsd-decay-iters 4 --lr-wsd-decay-style linear")
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    assert lrs == pytest.approx([0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0])
    for flags, message in (("--lr-decay-style WSD", "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
                           ("--lr-wsd-decay-iters 4", "--lr-wsd-decay-iters applies to --lr-decay-style WSD"),
                           ("--lr-decay-style WSD --lr-wsd-decay-iters 9 --lr-warmup-iters 2",
                            r"--lr-wsd-decay-iters \(9\) must be between 1 and the 8 decay steps after the warm-up")):
        with pytest.raises(SystemExit):
            scheduler_for(f"--train-iters 10 {flags}")
        assert re.search(message, capsys.readouterr().err), flags
