"""One optimizer step over a global batch, through megatron's pipeline schedules.

Training logic plugs in as a `forward_step(data_iterator, model) -> (output, loss_func)`
pair, where `loss_func(output) -> (loss_sum, count, metrics)`. With
`calculate_per_token_loss`, megatron sums `count` over micro-batches and DP ranks and
divides the gradients by it, so the update of a global batch does not depend on how
it is split into micro-batches or ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from engine.model.lora import allreduce_partial_adapter_grads
from engine.model.spec import moe_layers
from engine.platform import current_device
from engine.training.p2p import schedule_communication


@dataclass
class StepResult:
    """What one step produced; metrics are global means over the batch (valid on every rank)."""

    metrics: dict[str, float] = field(default_factory=dict)
    grad_norm: float | None = None
    update_successful: bool = True
    skipped_nonfinite: bool = False
    """The update was skipped because the loss or the gradient norm was NaN or infinite."""
    learning_rate: float | None = None
    """The rate this update used (the scheduler has already moved on to the next one)."""


def finalize_grads(model: list[torch.nn.Module], num_tokens: torch.Tensor | None = None, pg_collection=None,
                   force_all_reduce: bool = False) -> None:
    """megatron's grad finalization, then the TP sum of LoRA grads each TP rank holds a part of."""
    finalize_model_grads(model, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    allreduce_partial_adapter_grads(model)


def prepare_model_config(model: list[torch.nn.Module], optimizer: MegatronOptimizer | None) -> None:
    """Hooks megatron's schedules need: loss scaling, grad finalization, DDP no-sync."""
    config = model[0].config
    config.finalize_model_grads_func = finalize_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model if hasattr(chunk, "no_sync")]
    if no_sync:
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def reduce_metrics(collected: list[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, float]:
    """Sum each metric's (numerator, denominator) pairs over micro-batches, then over DP and
    pipeline ranks (only the last stage has them), and return numerator / denominator; a metric
    whose denominator is 0 (KTO's rewards/rejected of a batch without undesirable samples) is left
    out, as TRL does, rather than logged as 0.

    `names` are the metrics the loss function returns (`PairwiseObjective.metric_names`), known on every
    rank, so nothing but the sums crosses ranks; the ratios come back to the host in one read.
    """
    if collected:
        returned = sorted(collected[0])
        if returned != sorted(names):
            raise ValueError(f"the loss function returned metrics {returned}, but declared {sorted(names)}")
        totals = torch.stack([torch.stack([mb[n] for n in names]) for mb in collected]).double().sum(dim=0)
    else:  # ranks before the last stage join the collectives with zeros
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=current_device())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return {name: total / count for name, (total, count) in zip(names, totals.tolist()) if count > 0}


def chunk_iterators(items: list, model: list[torch.nn.Module]) -> list[Iterator]:
    """One iterator over the micro-batch items per model chunk (virtual pipeline stage)."""
    return [iter(items) for _ in model]


def forward_only(forward_step: Callable, items: list, model: list[torch.nn.Module],
                 collect_non_loss_data: bool = False) -> list:
    """megatron's schedule without backward over `(batch, extra)` items: evaluation and the reference pass."""
    batches = [batch for batch, _ in items]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=chunk_iterators(items, model),
        model=model,
        num_microbatches=len(items),
        seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=batches[0].tokens.shape[0],
        forward_only=True,
        collect_non_loss_data=collect_non_loss_data,
        **schedule_communication(model),
    )


def guarded_optimizer_step(optimizer: MegatronOptimizer, loss_is_finite: bool) -> tuple[bool, float | None]:
    """megatron's optimizer step, except that a non-finite loss or gradient norm skips the update.

    megatron's bf16/fp32 optimizers step on whatever the gradients hold; a NaN norm would turn
    the clip coefficient, and then every weight, into NaN. The norm is computed first (it is
    all-reduced over the ranks that share it, so every rank takes the same decision), and the
    update is applied only when it and the loss are finite. Returns (updated, grad norm).
    """
    if optimizer.prepare_grads():  # fp16 loss-scale overflow: the scaler already backed off
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        parameters = inner.get_parameters()
        if parameters and inner.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                parameters, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return optimizer.step_with_ready_grads(), grad_norm


ROUTER_LOSSES = {"load_balancing_loss": "moe/load_balancing_loss", "seq_load_balancing_loss": "moe/load_balancing_loss",
                 "z_loss": "moe/z_loss"}
"""megatron-core's aux-loss tracker names -> the logged metric names."""


def tracked_router_losses(config: TransformerConfig) -> list[str]:
    """The tracker names of the router losses the model computes (their coefficient set)."""
    names = []
    if config.moe_aux_loss_coeff > 0 and config.moe_router_load_balancing_type in ("aux_loss", "seq_aux_loss"):
        names.append("load_balancing_loss" if config.moe_router_load_balancing_type == "aux_loss"
                     else "seq_load_balancing_loss")
    if config.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def router_loss_metrics(config: TransformerConfig, num_microbatches: int) -> dict[str, float]:
    """The router losses of the step that just ran (its policy forwards only: megatron's routers add them
    only in training mode with gradients), each the mean over the MoE layers (dense layers under
    --moe-layer-freq have no router) and over the global batch's micro-batches, then megatron's tracker is
    cleared for the next step.

    megatron's tracker holds, per layer, the sum over this rank's micro-batches; its own reduction averages
    with ReduceOp.AVG, which gloo lacks, so the same reduction is done here with sums: over the tracker's
    reduce group (the TP ranks hold partial sums of both losses: the z-loss is the engine's router's,
    engine.model.router), over the pipeline stages (each holds its layers; a stage of dense layers only has no
    entry and adds zeros), then the mean over DP ranks.
    """
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    metrics: dict[str, float] = {}
    for name in tracked_router_losses(config):
        entry = tracker.get(name)
        if entry is None:
            values = torch.zeros(config.num_layers, device=current_device())
        else:
            values = entry["values"].detach().float().clone()
            if entry.get("reduce_group") is not None:
                torch.distributed.all_reduce(values, group=entry["reduce_group"])
        torch.distributed.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        group = parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(values, group=group)
        values /= torch.distributed.get_world_size(group)
        metrics[ROUTER_LOSSES[name]] = values.sum().item() / sum(moe_layers(config)) / num_microbatches
    clear_aux_losses_tracker()
    return metrics


def train_step(
    forward_step: Callable,
    data_iterator: Iterator | list[Iterator],
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler | None,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    metric_names: Sequence[str],
) -> StepResult:
    """One update over a global batch; `metric_names` are those the loss function returns (see `reduce_metrics`)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    collected = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
        **schedule_communication(model),
    )
    metrics = reduce_metrics(collected, metric_names)
    config = model[0].config
    if config.num_moe_experts is not None:
        metrics.update(router_loss_metrics(config, num_microbatches))
    learning_rate = optimizer.param_groups[0]["lr"]
    loss_is_finite = all(math.isfinite(value) for value in metrics.values())
    update_successful, grad_norm = guarded_optimizer_step(optimizer, loss_is_finite)
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(
        metrics=metrics,
        grad_norm=grad_norm,
        update_successful=update_successful,
        skipped_nonfinite=not update_successful and (not loss_is_finite or grad_norm is not None),
        learning_rate=learning_rate,
    )
