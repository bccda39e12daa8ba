"""Optimizer and learning-rate schedule: megatron-core's, configured from the engine config."""

from __future__ import annotations

import logging

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from engine.arguments import EngineConfig, TrainingConfig
from engine.checkpoint.layout import CheckpointError

logger = logging.getLogger(__name__)

SCHEDULE_VALUES = {
    "max_lr": "peak lr", "min_lr": "min lr", "lr_warmup_steps": "warm-up steps", "lr_decay_steps": "decay steps",
    "lr_decay_style": "decay style", "start_wd": "weight decay",
}
"""The scheduler state a resume compares with the flags (OptimizerParamScheduler.state_dict keys), as named
in messages."""


def build_optimizer(config: EngineConfig, model_chunks: list[torch.nn.Module]) -> MegatronOptimizer:
    """Adam with fp32 main params for bf16/fp16 models; sharded over DP with the distributed optimizer."""
    train, prec = config.training, config.precision
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=prec.bf16,
        fp16=prec.fp16,
        params_dtype=prec.params_dtype,
        initial_loss_scale=prec.initial_loss_scale if prec.fp16 else None,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    return get_megatron_optimizer(optimizer_config, model_chunks)


def build_scheduler(config: EngineConfig, optimizer: MegatronOptimizer) -> OptimizerParamScheduler:
    """Warm-up then decay, counted in optimizer steps (Megatron-LM counts samples; same shape)."""
    train = config.training
    if train.train_iters is None:
        raise ValueError("training needs --train-iters (the learning-rate schedule is laid out over it)")
    decay_steps = train.lr_decay_iters or train.train_iters
    if train.lr_warmup_fraction is not None:
        # Not rounded, as in Megatron-LM (whose steps are samples): a fraction worth less than one step
        # still warms up (the first update uses --lr-warmup-init) instead of vanishing.
        warmup_steps = train.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = train.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=train.lr_warmup_init,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=train.lr_decay_style,
        use_checkpoint_opt_param_scheduler=train.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=train.override_opt_param_scheduler,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=train.lr_wsd_decay_iters,
        lr_wsd_decay_style=train.lr_wsd_decay_style,
    )


def restore_scheduler(scheduler: OptimizerParamScheduler, saved: dict, train: TrainingConfig) -> None:
    """Moves the flags' schedule to the checkpoint's step, under Megatron-LM's contract.

    --override-opt-param-scheduler keeps the flags' values, --use-checkpoint-opt-param-scheduler takes the
    checkpoint's (megatron-core applies either). With neither, Megatron-LM asserts that they agree; here a
    difference is one CheckpointError naming the flags and both ways out. Without this, a run extended with a
    larger --train-iters silently kept the checkpoint's decay steps and trained every new step at --min-lr.
    """
    if train.override_opt_param_scheduler or train.use_checkpoint_opt_param_scheduler:
        scheduler.load_state_dict(saved)
        if train.use_checkpoint_opt_param_scheduler and scheduler.lr_decay_style != "constant" \
                and scheduler.lr_decay_steps < train.train_iters:
            logger.warning(
                "--use-checkpoint-opt-param-scheduler: the checkpoint's schedule decays over %d steps, so steps "
                "%d-%d train at its min lr %g", scheduler.lr_decay_steps, scheduler.lr_decay_steps + 1,
                train.train_iters, scheduler.min_lr,
            )
        return
    changes = schedule_changes(scheduler, saved, train)
    if changes:
        raise CheckpointError(
            f"the flags change the checkpoint's learning-rate schedule: {'; '.join(changes)}; pass "
            f"--override-opt-param-scheduler to train on the flags' schedule from step {saved['num_steps'] + 1}, "
            "or --use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )
    scheduler.step(increment=saved["num_steps"])


def schedule_changes(scheduler: OptimizerParamScheduler, saved: dict, train: TrainingConfig) -> list[str]:
    """'FLAG: NAME checkpoint -> flags' for each schedule value the flags change. Values a constant schedule
    never reads (decay steps, min lr) are no change: extending a constant-lr run needs no flag."""
    flags = {
        "max_lr": "--lr", "min_lr": "--min-lr", "lr_decay_style": "--lr-decay-style", "start_wd": "--weight-decay",
        "lr_warmup_steps": "--lr-warmup-fraction" if train.lr_warmup_fraction is not None else "--lr-warmup-iters",
        "lr_decay_steps": "--lr-decay-iters" if train.lr_decay_iters is not None else "--train-iters",
    }
    unread = {"lr_decay_steps", "min_lr"} if scheduler.lr_decay_style == saved["lr_decay_style"] == "constant" \
        else set()
    return [f"{flags[key]}: {name} {saved[key]} -> {getattr(scheduler, key)}" for key, name in SCHEDULE_VALUES.items()
            if key not in unread and saved[key] != getattr(scheduler, key)]
