"""Preemption and failure on a real run: SIGKILL then resume, SIGINT with the exit handler,
--exit-interval, the save-dir lock, the divergence guard, extending a finished run, exit codes."""

from __future__ import annotations

import math
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.distributed.harness import CliProcess, run_torchrun
from tests.e2e.test_dpo import SEQ, TRAIN, Assets, read_metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    return Assets(tmp_path_factory.mktemp("reliability"))


def run_args(assets: Assets, save: Path, extra: str) -> list[str]:
    checkpoint, flags = assets.checkpoint(1, 1)
    if not save.exists():  # MindSpeed-LLM flow: train inside a copy of the converted checkpoint
        shutil.copytree(checkpoint, save)
    return [*flags, *SEQ, *TRAIN, "--data-path", assets.data_prefix, "--load", str(save), "--save", str(save),
            "--micro-batch-size", "4", *extra.split()]


def start(assets: Assets, save: Path, extra: str) -> CliProcess:
    """One rank, without torchrun, so a signal reaches the training process itself."""
    return CliProcess("pretrain_dpo", run_args(assets, save, extra))


def finish(process: CliProcess, timeout: float = 300) -> tuple[int, str]:
    return process.finish(timeout)


def wait_for_iteration(save: Path, iteration: int, process: CliProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (save / "metrics.jsonl").exists() and any(r["iteration"] >= iteration for r in read_metrics(save)):
            return
        assert process.poll() is None, process.stderr()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"iteration {iteration} not reached")


def losses(save: Path) -> list[float]:
    rows = read_metrics(save)
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def test_sigkill_sigterm_and_exit_interval_all_resume_exactly(assets, tmp_path):
    code, err = finish(start(assets, tmp_path / "straight", "--train-iters 8"))
    assert code == 0, err[-3000:]
    straight = losses(tmp_path / "straight")

    # SIGKILL at an arbitrary moment of a run that saves every iteration (often mid-save).
    killed = tmp_path / "killed"
    process = start(assets, killed, "--train-iters 8 --save-interval 1")
    wait_for_iteration(killed, 4, process)
    process.send_signal(signal.SIGKILL)
    assert process.finish()[0] == -signal.SIGKILL
    code, err = finish(start(assets, killed, "--train-iters 8 --save-interval 1"))
    assert code == 0, err[-3000:]
    assert losses(killed) == straight
    # Trained inside the converted checkpoint's directory: its iteration 1, the reference, was never replaced.
    converted = assets.checkpoint(1, 1)[0] / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    assert (killed / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").read_bytes() == converted.read_bytes()

    # Ctrl-C (SIGINT) with --exit-signal-handler: a checkpoint at the next iteration boundary, exit 0.
    # (SIGTERM takes the same handler: tests/unit/training/test_reliability.py.)
    stopped = tmp_path / "stopped"
    process = start(assets, stopped, "--train-iters 8 --exit-signal-handler")
    wait_for_iteration(stopped, 2, process)
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert code == 0, err[-3000:]
    saved_at = int((stopped / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= saved_at < 8
    code, err = finish(start(assets, stopped, "--train-iters 8"))
    assert code == 0, err[-3000:]
    assert losses(stopped) == straight

    interval = tmp_path / "interval"
    code, err = finish(start(assets, interval, "--train-iters 8 --exit-interval 3"))
    assert code == 0, err[-3000:]
    assert (interval / "latest_checkpointed_iteration.txt").read_text() == "3"


def test_save_directory_is_locked_while_a_run_uses_it(assets, tmp_path):
    save = tmp_path / "busy"
    first = start(assets, save, "--train-iters 200")
    try:
        wait_for_iteration(save, 1, first)
        code, err = finish(start(assets, save, "--train-iters 5"))
        assert code == 2
        assert f"--save {save} is in use by another run (pid {first.pid}" in err
    finally:
        first.kill()


def test_a_diverging_run_skips_updates_then_stops_with_a_clear_error(assets, tmp_path):
    # An absurd learning rate wrecks the weights after one update; every later loss is non-finite.
    code, err = finish(start(assets, tmp_path / "diverged", "--train-iters 20 --lr 1e30 --max-skipped-iters 2"))
    assert code == 3, err[-3000:]
    assert "2 consecutive updates skipped for a non-finite loss or gradient norm" in err
    assert "update skipped" in err and "train pairs of the batch: [" in err


def test_extending_a_run_needs_a_schedule_choice_and_a_finished_run_is_not_saved_again(assets, tmp_path):
    save = tmp_path / "extended"
    code, err = finish(start(assets, save, "--train-iters 2 --lr-decay-style cosine"))
    assert code == 0, err[-3000:]

    # A known error under torchrun: one line from rank 0, the worker's exit code 2, torchrun's own exit code 1.
    refused = run_torchrun("pretrain_dpo.py", run_args(assets, save, "--train-iters 4 --lr-decay-style cosine"), 1)
    assert refused.returncode == 1
    assert refused.stderr.count("pretrain_dpo.py: error:") == 1
    assert ("pretrain_dpo.py: error: the flags change the checkpoint's learning-rate schedule: --train-iters: decay "
            "steps 2 -> 4; pass --override-opt-param-scheduler to train on the flags' schedule from step 3, or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's\n") in refused.stderr
    assert "exitcode  : 2" in refused.stderr and "ChildFailedError" in refused.stderr

    code, err = finish(start(assets, save, "--train-iters 4 --lr-decay-style cosine --override-opt-param-scheduler"))
    assert code == 0, err[-3000:]
    lrs = [row["lr"] for row in read_metrics(save)]
    assert lrs[2:] == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * step / 4)) for step in (2, 3)])  # not 0

    saved = save / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    written = saved.stat().st_mtime_ns
    code, err = finish(start(assets, save, "--train-iters 3 --lr-decay-style cosine"))
    assert code == 0, err[-3000:]
    assert "nothing to train: the checkpoint is at iteration 4, --train-iters is 3; no checkpoint written" in err
    assert saved.stat().st_mtime_ns == written and (save / "latest_checkpointed_iteration.txt").read_text() == "4"
