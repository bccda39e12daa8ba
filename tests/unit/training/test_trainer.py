"""Data that cannot serve the flags is said before training: no validation pairs for --eval-interval, a global
batch larger than the training split."""

from __future__ import annotations

import pytest
import torch

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


# -- the loop's clock and memory peak, with the platform and the step recorded -------------------------------

class RecordingPlatform:
    """The Platform calls the loop makes, in order, beside the clock reads and steps."""

    def __init__(self, events: list):
        self.events = events

    def synchronize(self):
        self.events.append("sync")

    def reset_peak_memory(self):
        self.events.append("reset peak")

    def peak_memory_bytes(self):
        self.events.append("read peak")
        return 3 * 2**30


def test_step_time_is_read_after_a_device_sync_and_the_peak_restarts_every_log_interval(monkeypatch):
    from types import SimpleNamespace

    import engine.training.trainer as trainer_module
    from engine.training.checkpointing import TrainState
    from engine.training.step import StepResult
    from engine.training.trainer import DPOTrainer

    events, logged, now = [], [], [0.0]

    def perf_counter():
        events.append("clock")
        now[0] += 0.25
        return now[0]

    def train_step(*args):
        events.append("step")
        return StepResult(metrics={"loss": 0.5}, grad_norm=1.0, learning_rate=1e-3)

    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(trainer_module, "train_step", train_step)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.config = SimpleNamespace(
        training=TrainingConfig(global_batch_size=2, train_iters=4), logging=SimpleNamespace(log_interval=2),
        checkpoint=SimpleNamespace(save=None))
    trainer.platform, trainer.state, trainer.skipped_in_a_row, trainer.peak_tflops = RecordingPlatform(events), \
        TrainState(), 0, None
    trainer.model, trainer.optimizer, trainer.scheduler, trainer.num_microbatches = [None], None, None, 1
    trainer.objective = SimpleNamespace(needs_current_logps=False, policy_forward_step=None, metric_names=("loss",))
    trainer.metrics = SimpleNamespace(log=lambda iteration, scalars: (events.append("log"), logged.append(scalars)))
    trainer.checkpointer = SimpleNamespace(interval_due=lambda iteration: False)
    trainer.exit_conditions = SimpleNamespace(check=lambda iteration: None)
    trainer._sampler = lambda split, consumed: iter([[[0, 1]]] * 4)
    trainer._micro_batches = lambda split, indices: ([SimpleNamespace(tokens=torch.zeros(1, 8))], [5, 3])
    trainer._with_reference = lambda micro_batches, split: [(b, None) for b in micro_batches]
    trainer._global_work = lambda lengths: (8.0, 1e12)

    assert trainer.train().iteration == 4
    step = ["sync", "clock", "step", "sync", "clock"]
    interval = step + step + ["read peak", "log", "reset peak"]
    assert events == ["reset peak"] + interval + interval
    assert [row["step_time_s"] for row in logged] == [0.25, 0.25]  # one clock pair per step, nothing else
    assert [row["peak_memory_gib"] for row in logged] == [3.0, 3.0] and logged[0]["tokens_per_s"] == 32.0


@pytest.mark.parametrize("flags, reference, passes", [
    ("", "ReferencePolicy", 4),  # the policy's forward + backward (3 forwards) and the frozen reference's
    ("", "CachedReference", 3),  # --precompute-ref-logps: no reference forward
    ("--stage simpo", "NoReference", 3),
    ("--dpo-loss-type bco_pair", "ReferencePolicy", 5),  # + the policy's pass for the reward shift
    ("--stage kto --micro-batch-size 2", "ReferencePolicy", 5),  # + the policy's pass for the KL point
])
def test_the_step_flops_count_each_forward_pass_the_step_runs(monkeypatch, flags, reference, passes):
    """tflops_per_device's FLOPs: the passes README's metrics table lists, each of forward_flops."""
    import engine.training.reference as reference_module
    import engine.training.reference_cache as cache_module
    import engine.training.trainer as trainer_module
    from engine.arguments import parse_args
    from engine.dpo.stages import build_objective
    from engine.training.metrics import forward_flops
    from engine.training.trainer import DPOTrainer

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: None)  # one DP rank
    monkeypatch.setattr(trainer_module.parallel_state, "get_data_parallel_group", lambda: None)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.config = parse_args(("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
                                 f"--vocab-size 100 {flags}").split(), world_size=1)
    trainer.reference = getattr(reference_module, reference, None) or getattr(cache_module, reference)
    trainer.objective = build_objective(trainer.config.preference, 100)
    lengths = [(40, 12), (64, 30)]  # (tokens, positions the output layer runs on) of each sequence or row
    tokens, flops = trainer._global_work(lengths)
    one_pass = sum(forward_flops(trainer.config.model, trainer.config.padded_vocab_size, n, outputs)
                   for n, outputs in lengths)
    assert tokens == 104 and flops == pytest.approx(passes * one_pass, rel=1e-12)
