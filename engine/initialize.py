"""torch.distributed, megatron parallel state and seeds: the only place that sets them up."""

from __future__ import annotations

import logging
import os
import random
from datetime import timedelta

import numpy as np
import torch

from engine.arguments import ParallelConfig
from engine.platform import CPU_ADAPTOR, Platform, detect_platform, enable_deterministic_mode

logger = logging.getLogger(__name__)


def initialize_distributed(parallel: ParallelConfig, virtual_pipeline_size: int | None = None,
                           deterministic_mode: bool = False) -> Platform:
    """Joins the torchrun process group and builds megatron's TP/PP/DP groups (and EP/ETP for experts).

    Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    a plain `python` launch runs as a world of one. Without CUDA the CPU adaptor is
    installed first, since megatron's group set-up already touches torch.cuda.
    --deterministic-mode is applied before the first CUDA call, which fixes NCCL's and cuBLAS's choices.
    """
    from megatron.core import parallel_state

    platform = detect_platform(parallel.distributed_backend)
    if deterministic_mode:
        enable_deterministic_mode()
    if not platform.is_cuda:
        CPU_ADAPTOR.install()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    platform.bind_local_device(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=platform.backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_size,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_size,
        )
    logger.info(
        "rank %d/%d on %s (%s): TP=%d PP=%d DP=%d EP=%d ETP=%d",
        rank,
        world_size,
        platform.device_type,
        platform.backend,
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel_state.get_data_parallel_world_size(),
        parallel.expert_model_parallel_size,
        parallel.expert_tensor_size,
    )
    return platform


def set_random_seeds(seed: int) -> None:
    """Same seed for data-parallel replicas, distinct TP streams, as Megatron-LM does.

    Pipeline stages get offset seeds so their (different) layers do not share init noise.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tears down megatron's groups and the process group (tests run several layouts per process)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
