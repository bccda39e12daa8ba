"""Optimizer and learning-rate schedule: megatron-core's, configured from the engine config."""

from __future__ import annotations

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from engine.arguments import EngineConfig


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
        warmup_steps = int(train.lr_warmup_fraction * decay_steps)
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
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=decay_steps if train.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if train.lr_decay_style == "WSD" else None,
    )
