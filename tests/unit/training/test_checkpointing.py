"""Loading and saving refuse what does not fit, with one line naming the flag or file: architecture, layout,
adapter-only checkpoints, a missing tracker, corrupted files and failed writes on one rank of several."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.arguments import parse_args
from engine.checkpoint.layout import CheckpointError
from engine.training.checkpointing import check_model_args, check_parallel_layout, latest_iteration
from tests.distributed.harness import run_ranks

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --vocab-size 64 "
        "--make-vocab-size-divisible-by 8 --swiglu --disable-bias-linear --train-iters 10").split()


def config(*flags: str, world_size: int = 1):
    return parse_args([*TINY, *flags], world_size=world_size)


def saved_args(*flags: str) -> dict:
    """The flat args a checkpoint records (Checkpointer.saved_args' model part)."""
    from dataclasses import asdict

    run = config(*flags)
    return {**asdict(run.model), "tensor_model_parallel_size": 1, "padded_vocab_size": run.padded_vocab_size}


def test_every_math_changing_model_flag_is_compared():
    path = Path("ckpt/iter_0000001/mp_rank_00/model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=r"--norm-epsilon: checkpoint 1e-05, flags 1e-06$"):
        check_model_args(saved_args(), config("--norm-epsilon", "1e-6"), path)
    with pytest.raises(CheckpointError, match="--rope-scaling-type: checkpoint None, flags 'llama3'"):
        check_model_args(saved_args(), config("--use-rope-scaling"), path)
    with pytest.raises(CheckpointError, match="--rope-scaling-factor: checkpoint 8.0, flags 32.0"):
        check_model_args(saved_args("--use-rope-scaling"), config("--use-rope-scaling", "--rope-scaling-factor", "32"),
                         path)
    with pytest.raises(CheckpointError, match="--position-embedding-type: checkpoint 'rope'"):
        check_model_args(saved_args(), config("--position-embedding-type", "learned_absolute"), path)
    with pytest.raises(CheckpointError, match="--disable-bias-linear: checkpoint True, flags False"):
        check_model_args(saved_args(), parse_args([a for a in TINY if a != "--disable-bias-linear"], world_size=1),
                         path)
    with pytest.raises(CheckpointError, match="padded vocab 64, flags' 128"):
        check_model_args(saved_args(), config("--make-vocab-size-divisible-by", "128"), path)
    # The converter records the rounding rule's inputs instead of the padded size.
    converted = {**saved_args(), "padded_vocab_size": None, "make_vocab_size_divisible_by": 16}
    with pytest.raises(CheckpointError, match="padded vocab 64, flags' 128"):
        check_model_args(converted, config("--make-vocab-size-divisible-by", "128"), path)
    check_model_args(converted, config(), path)
    # Training choices are not the architecture; scaling factors are unread without scaling.
    check_model_args(saved_args(), config("--hidden-dropout", "0.1", "--rope-scaling-factor", "4"), path)


def test_the_moe_layer_pattern_is_compared_whatever_its_spelling():
    path = Path("ckpt/iter_0000001/mp_rank_00/model_optim_rng.pt")
    moe = ("--num-experts", "4")
    converted = {**saved_args(*moe), "num_experts": 4, "moe_layer_freq": [0, 1]}  # what hf -> mg records
    check_model_args(converted, config(*moe, "--moe-layer-freq", "[0,1]"), path)
    with pytest.raises(CheckpointError, match=r"--moe-layer-freq: checkpoint \[0, 1\], flags \[1, 0\]"):
        check_model_args(converted, config(*moe, "--moe-layer-freq", "2"), path)
    # a checkpoint that records no pattern (every layer MoE, before the flag) is megatron's default, 1
    older = {**saved_args(*moe), "num_experts": 4}
    check_model_args(older, config(*moe, "--moe-layer-freq", "[1]*2"), path)
    with pytest.raises(CheckpointError, match=r"--moe-layer-freq: checkpoint \[1, 1\], flags \[0, 1\]"):
        check_model_args(older, config(*moe, "--moe-layer-freq", "[0,1]"), path)


def test_a_checkpoint_in_another_tp_layout_says_how_to_convert_it(tmp_path):
    for rank in ("mp_rank_00", "mp_rank_01"):
        (tmp_path / "iter_0000003" / rank).mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        check_parallel_layout(str(tmp_path), 3, config())
    assert str(err.value) == (
        f"{tmp_path}/iter_0000003 was saved with TP2 PP1, the run uses TP1 PP1: run with "
        "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1, or convert it with "
        f"tools/checkpoint/convert_ckpt.py --load-model-type mg --save-model-type mg --load-dir {tmp_path} "
        "--save-dir NEW_DIR --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1"
    )


def test_a_deleted_tracker_lists_the_saved_iterations_and_how_to_pick_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"no latest_checkpointed_iteration.txt there$"):
        latest_iteration(str(tmp_path), "--load")
    for iteration in (2, 4):
        (tmp_path / f"iter_000000{iteration}").mkdir()
    with pytest.raises(CheckpointError) as err:
        latest_iteration(str(tmp_path), "--load")
    assert str(err.value) == (
        f"--load {tmp_path}: no latest_checkpointed_iteration.txt there, but it holds iter_0000002, iter_0000004: "
        f"to load one, write its iteration into the tracker, e.g. echo 4 > {tmp_path}/latest_checkpointed_iteration.txt"
    )


def _failures_on_one_rank(root: str) -> dict:
    """TP2: save, then break rank 1's file or its disk; every rank must stop with rank 1's message."""
    import torch.distributed as dist

    from engine.checkpoint import manifest
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_trainable_model
    from engine.training.checkpointing import Checkpointer, TrainState, load_model_weights
    from engine.training.optimizer import build_optimizer, build_scheduler

    def build(*flags):
        run = config("--tensor-model-parallel-size", "2", *flags, world_size=2)
        model = build_trainable_model(run, platform)
        optimizer = build_optimizer(run, model)
        return run, model, optimizer, build_scheduler(run, optimizer)

    def error(action) -> str:
        try:
            action()
        except CheckpointError as err:
            return str(err)
        return "no error"

    rank = int(os.environ["RANK"])
    platform = initialize_distributed(config("--tensor-model-parallel-size", "2", world_size=2).parallel)
    set_random_seeds(1)
    run, model, optimizer, scheduler = build("--save", f"{root}/full")
    Checkpointer(run).save(1, model, optimizer, scheduler, TrainState(iteration=1))

    out = {}
    lora, lora_model, lora_optimizer, lora_scheduler = build("--lora-r", "4", "--lora-ckpt-filter", "--load",
                                                             f"{root}/full", "--save", f"{root}/adapters")
    Checkpointer(lora).save(1, lora_model, lora_optimizer, lora_scheduler, TrainState(iteration=1))
    out["adapter-only"] = error(lambda: load_model_weights(model, f"{root}/adapters", 1, run))

    real_open = open
    if rank == 1:  # the disk of rank 1 fills up during its write
        manifest.open = lambda path, mode: _FullDisk(real_open(path, mode))
    out["disk full"] = error(lambda: Checkpointer(run).save(2, model, optimizer, scheduler, TrainState(iteration=2)))
    if rank == 1:
        del manifest.open

    if rank == 1:
        path = Path(root, "full", "iter_0000001", "mp_rank_01", "model_optim_rng.pt")
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    dist.barrier()
    out["flipped"] = error(lambda: load_model_weights(model, f"{root}/full", 1, run))
    return out


class _FullDisk:
    def __init__(self, file):
        self.file = file

    def write(self, data) -> int:
        raise OSError(28, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    ranks = run_ranks(_failures_on_one_rank, 2, str(tmp_path))
    for out in ranks:
        assert out["adapter-only"] == (
            f"{tmp_path}/adapters is an adapter-only LoRA checkpoint (saved with --lora-ckpt-filter) and holds no "
            f"base weights: pass --load {tmp_path}/full --lora-load {tmp_path}/adapters with the run's --lora-r"
        )
        assert out["disk full"].startswith(
            f"rank 1: could not write {tmp_path}/full/.staging_iter_0000002/mp_rank_01/model_optim_rng.pt "
            "(No space left on device)")
        assert out["flipped"].startswith(
            f"rank 1: {tmp_path}/full/iter_0000001/mp_rank_01/model_optim_rng.pt does not match its checksum")
    assert (tmp_path / "full" / "latest_checkpointed_iteration.txt").read_text() == "1"


def _round_trip(save_dir):
    import torch

    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_trainable_model, unwrap_model
    from engine.training.checkpointing import Checkpointer, TrainState
    from engine.training.optimizer import build_optimizer, build_scheduler

    run = config("--save", save_dir, "--load", save_dir, "--lr", "1e-3")
    platform = initialize_distributed(run.parallel)

    def build(seed):
        set_random_seeds(seed)
        model = build_trainable_model(run, platform)
        optimizer = build_optimizer(run, model)
        return model, optimizer, build_scheduler(run, optimizer)

    model, optimizer, scheduler = build(1)
    for _ in range(3):
        scheduler.step(increment=1)
    saved_rng = torch.get_rng_state()
    Checkpointer(run).save(3, model, optimizer, scheduler, TrainState(3, 24, 0, 1), extra={"objective": {"x": 1}})
    fresh, fresh_optimizer, fresh_scheduler = build(2)
    same = lambda: all(torch.equal(a, b) for a, b in zip(unwrap_model(model[0]).parameters(),  # noqa: E731
                                                          unwrap_model(fresh[0]).parameters()))
    equal_before = same()
    checkpointer = Checkpointer(run)
    iteration, rank_state = checkpointer.load_policy(fresh)
    state = checkpointer.restore_training_state(iteration, rank_state, fresh_optimizer, fresh_scheduler)
    rng_restored = torch.equal(torch.get_rng_state(), saved_rng)
    # Megatron-LM's --no-load-optim (optimizer and schedule) and --no-load-rng each skip their part of a resume.
    skipped = {}
    for flag in ("--no-load-optim", "--no-load-rng"):
        _, partial_optimizer, partial_scheduler = build(2)
        partial = Checkpointer(config("--save", save_dir, "--load", save_dir, "--lr", "1e-3", flag))
        partial_state = partial.restore_training_state(iteration, rank_state, partial_optimizer, partial_scheduler)
        skipped[flag] = (partial_state, partial_scheduler.num_steps, torch.equal(torch.get_rng_state(), saved_rng))
    return iteration, state, fresh_scheduler.num_steps, rank_state["objective"], (equal_before, same()), rng_restored, \
        skipped


def test_save_and_load_round_trip_on_one_rank(tmp_path):
    from engine.training.checkpointing import TrainState

    iteration, state, scheduler_steps, extra, equal, rng, skipped = run_ranks(_round_trip, 1, str(tmp_path / "run"))[0]
    assert iteration == 3 and state == TrainState(3, 24, 0, 1)
    assert scheduler_steps == 3 and extra == {"x": 1} and rng
    assert equal == (False, True)  # other random weights before the load, the saved ones after
    # The training state (iteration, consumed pairs) is restored either way; the skipped part starts fresh.
    assert skipped == {"--no-load-optim": (TrainState(3, 24, 0, 1), 0, True),
                       "--no-load-rng": (TrainState(3, 24, 0, 1), 3, False)}
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
