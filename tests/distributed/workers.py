"""Rank functions for the layout-parity tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from engine.arguments import EngineConfig, parse_args
from engine.checkpoint.sharding import shard_state_dict
from engine.initialize import initialize_distributed, set_random_seeds
from engine.model.provider import build_frozen_model, build_trainable_model, unwrap_model
from engine.training.checkpointing import run_layout
from engine.training.optimizer import build_optimizer, build_scheduler
from engine.training.step import prepare_model_config, train_step


def load_full_state(chunks: list[torch.nn.Module], full: dict, config: EngineConfig) -> None:
    layout = run_layout(config)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for index, chunk in enumerate(chunks):
        vp_stage = index if config.virtual_pipeline_size else None
        shard = shard_state_dict(full, layout, tp_rank, pp_rank, vp_stage, ep_rank)
        result = unwrap_model(chunk).load_state_dict(shard, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def _setup(argv: list[str]):
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
    config = parse_args(argv, world_size=world or int(__import__("os").environ["WORLD_SIZE"]))
    platform = initialize_distributed(config.parallel, config.virtual_pipeline_size)
    set_random_seeds(config.training.seed)
    return config, platform


def _iterators(config: EngineConfig, batches: list) -> list:
    copies = config.virtual_pipeline_size or 1
    return [iter(batches) for _ in range(copies)]


def _is_reporting_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def save_initial_state(argv: list[str], path: str) -> None:
    """World of one: build a random-init model and save its full state dict."""
    config, platform = _setup(argv)
    chunks = build_frozen_model(config, platform)
    state = {k: v for k, v in unwrap_model(chunks[0]).state_dict().items() if not k.endswith("_extra_state")}
    torch.save(state, path)


def forward_logits(argv: list[str], state_path: str, tokens: torch.Tensor):
    """Logits of `tokens` (one sample per micro-batch, gathered over TP) on the reporting rank; None elsewhere."""
    config, platform = _setup(argv)
    chunks = build_frozen_model(config, platform)
    load_full_state(chunks, torch.load(state_path), config)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None)
        return output, lambda out, non_loss_data=False: gather_from_tensor_model_parallel_region(out)

    collected = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=_iterators(config, list(tokens.split(1))), model=chunks,
        num_microbatches=tokens.shape[0], seq_length=tokens.shape[1], micro_batch_size=1,
        forward_only=True, collect_non_loss_data=True,
    )
    if not _is_reporting_rank():
        return None
    return torch.cat(collected)[..., : config.model.vocab_size].clone()


def _lm_loss(labels: torch.Tensor, per_token_loss: torch.Tensor):
    total = per_token_loss.float().sum()
    count = torch.tensor(labels.numel())
    return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}


def lm_train_steps(argv: list[str], state_path: str, samples: torch.Tensor, steps: int):
    """`steps` LM-loss optimizer steps over the same global batch; (losses, grad norms) on the reporting rank."""
    config, platform = _setup(argv)
    model = build_trainable_model(config, platform)
    load_full_state(model, torch.load(state_path), config)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    prepare_model_config(model, optimizer)
    train = config.training
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = train.global_batch_size // dp
    local = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    micro = [local[i : i + train.micro_batch_size] for i in range(0, per_rank, train.micro_batch_size)]
    seq = samples.shape[1] - 1

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(seq).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None, labels=labels)
        return output, partial(_lm_loss, labels)

    losses, norms = [], []
    for _ in range(steps):
        result = train_step(forward_step, _iterators(config, micro), model, optimizer, scheduler,
                            num_microbatches=len(micro), micro_batch_size=train.micro_batch_size, seq_length=seq,
                            metric_names=["lm loss"])
        losses.append(result.metrics["lm loss"])
        norms.append(result.grad_norm)
    return (losses, norms) if _is_reporting_rank() else None

