"""LoRA for megatron-core's tensor-parallel linears, sharded like the layer it adapts.

A LoRA layer adds `(alpha / r) * B A x` to a frozen linear `W x`. Both classes here
subclass megatron's layer and hook `_forward_impl`, the call that receives exactly
the tensors of the base GEMM, so the adapter branch sees the same input as the base
and its output joins the base output before the base's own communication:

- ColumnParallelLinear (W: [out/TP, in]): A [r, in] replicated, B [out/TP, r] split
  like W (for a gated fc1, [gate_i; up_i] rows as W). The input is gathered over the
  sequence (sequence parallel) or marked for a TP all-reduce of its gradient, once,
  for base and adapter together; the base GEMM then runs without communication.
- RowParallelLinear (W: [out, in/TP]): A [r, in/TP] split like W, B [out, r]
  replicated. `B A_i x_i` is added to the partial output before the base's
  all-reduce (or reduce-scatter under sequence parallel), which sums it over TP.

No activation is communicated beyond what the base layer does. The price is two
replicated adapter weights whose gradient is a partial sum per TP rank (column A:
each rank back-propagates through its B rows only; row B: each rank sees its A_i x_i
only). They carry `tp_partial_grad` and `allreduce_partial_adapter_grads` sums them
over TP (a routed expert's over its expert-TP group, --expert-tensor-parallel-size ranks)
once per step, after megatron's grad finalization (a [r, hidden] tensor per layer, versus activations of [sequence, batch, r] per micro-batch for the per-branch
all-reduce PEFT's megatron layers do).

Adapters are initialized from one generator per (seed, global layer, module) on the
full tensor, then sliced, so every TP/PP layout starts from the same adapters; B is
zero, so fresh adapters leave the model's output unchanged.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from engine.arguments import LORA_TARGETS
from engine.formats import VALUE_HEAD_KEY
from engine.platform import current_device

ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraSettings:
    """What one adapted layer needs to know (engine.arguments.LoraConfig carries the flags)."""

    r: int
    alpha: float
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter tensor (`...linear_qkv.lora_A.weight`)."""
    return any(marker in key for marker in ADAPTER_MARKERS)


def trained_with_adapters(key: str) -> bool:
    """What a LoRA run trains and saves beside the frozen base: the adapters, and a reward model's value head,
    which is new and trains in full (PEFT's `modules_to_save`)."""
    return is_adapter_key(key) or key == VALUE_HEAD_KEY


class _LoraMixin:
    """Adapter parameters, the on/off switch and the deterministic init shared by both layers."""

    lora_A: torch.nn.Linear
    lora_B: torch.nn.Linear

    def _add_adapters(self, lora: LoraSettings, a_in: int, b_out: int, sharded: str) -> None:
        self.lora = lora
        self.lora_enabled = True
        self.lora_dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else None
        dtype = self.config.params_dtype
        self.lora_A = torch.nn.Linear(a_in, lora.r, bias=False, dtype=dtype)
        self.lora_B = torch.nn.Linear(lora.r, b_out, bias=False, dtype=dtype)
        torch.nn.init.zeros_(self.lora_B.weight)
        split, partial = (self.lora_B, self.lora_A) if sharded == "B" else (self.lora_A, self.lora_B)
        set_tensor_model_parallel_attributes(split.weight, is_parallel=True, dim=0 if sharded == "B" else 1, stride=1)
        partial.weight.tp_partial_grad = True
        # A routed expert's linears split over the experts' TP group (ETP), which may be smaller than TP.
        partial.weight.expert_tp_partial_grad = self.is_expert
        # A routed expert's adapters, like its weights, are reduced over the experts' data-parallel group, not
        # the dense one (megatron's DDP reads `allreduce`): each EP rank holds other experts.
        for param in (self.lora_A.weight, self.lora_B.weight):
            param.allreduce = not (self.is_expert and self.expert_parallel)

    def reset_adapters(self, generator: torch.Generator, tp_rank: int) -> None:
        """A: kaiming-uniform (a=sqrt(5), as nn.Linear and PEFT) drawn whole, then this rank's slice; B: zero."""
        full_in = self.input_size
        bound = 1.0 / math.sqrt(full_in)
        full = torch.empty(self.lora.r, full_in, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        local = self.lora_A.weight.shape[1]  # == full_in when A is replicated (column-parallel)
        start = tp_rank * local if local != full_in else 0
        with torch.no_grad():
            self.lora_A.weight.copy_(full[:, start:start + local])
            self.lora_B.weight.zero_()

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_dropout is not None and self.training:
            x = self._dropout(x)
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.lora.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_dropout(x)


class LoraColumnParallelLinear(_LoraMixin, ColumnParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, lora: LoraSettings, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._add_adapters(lora, self.input_size, self.output_size_per_partition, sharded="B")

    def _forward_impl(self, input, weight, bias, *args, sequence_parallel=False, allreduce_dgrad=False,
                      tp_group=None, **kwargs):
        if not self.lora_enabled:
            return super()._forward_impl(input, weight, bias, *args, sequence_parallel=sequence_parallel,
                                         allreduce_dgrad=allreduce_dgrad, tp_group=tp_group, **kwargs)
        # Do the base layer's input communication here, once for both branches.
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        output = super()._forward_impl(input, weight, bias, *args, sequence_parallel=False, allreduce_dgrad=False,
                                       tp_group=tp_group, **kwargs)
        return output + self._adapter(input).to(output.dtype)


class LoraRowParallelLinear(_LoraMixin, RowParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, lora: LoraSettings, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        self._add_adapters(lora, self.input_size_per_partition, self.output_size, sharded="A")

    def _forward_impl(self, input, weight, *args, **kwargs):
        output = super()._forward_impl(input, weight, *args, **kwargs)
        if not self.lora_enabled:
            return output
        # Partial over TP like the base output: the base's reduce sums both.
        return output + self._adapter(input).to(output.dtype)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        with get_cuda_rng_tracker().fork():  # the input is TP-sharded: per-rank dropout streams
            return self.lora_dropout(x)


LoraLayer = (LoraColumnParallelLinear, LoraRowParallelLinear)


def lora_layers(module: torch.nn.Module) -> Iterator[tuple[str, _LoraMixin]]:
    for name, child in module.named_modules():
        if isinstance(child, LoraLayer):
            yield name, child


def prepare_adapters(chunks: list[torch.nn.Module], seed: int) -> None:
    """Freezes everything but the adapters (and a reward model's value head) and initializes the adapters
    identically for any TP/PP layout.

    Called on the bare GPTModel chunks, before mixed-precision and DDP wrapping, so DDP's
    grad buffers and the optimizer only ever see adapter parameters.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    expert_tp_rank = parallel_state.get_expert_tensor_parallel_rank()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(trained_with_adapters(name))
        for layer in chunk.decoder.layers:
            for name, module in lora_layers(layer):
                target = LORA_TARGETS.index(name.rsplit(".", 1)[-1])
                stream = seed * 1_000_003 + layer.layer_number * 8 + target + 100_003 * _expert_stream(name, layer)
                module.reset_adapters(torch.Generator().manual_seed(stream),
                                      expert_tp_rank if module.is_expert else tp_rank)
    found = sum(1 for chunk in chunks for _ in lora_layers(chunk))
    if not found:
        raise ValueError("LoRA is on but the model has no adapted layer (check --lora-target-modules)")


def _expert_stream(name: str, layer: torch.nn.Module) -> int:
    """0 for a dense linear, 1 for the shared expert's, 2 + E for routed expert E (its global index, the same
    under any EP): every expert starts from its own adapters, identical for every layout."""
    if ".shared_experts." in f".{name}":
        return 1
    marker = "experts.local_experts."
    if marker not in name:
        return 0
    local = int(name.split(marker, 1)[1].split(".", 1)[0])
    experts = layer.mlp.experts
    return 2 + parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts + local


@contextmanager
def adapters_disabled(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """The base model: every LoRA branch off (the LoRA DPO reference policy, no copy of the weights)."""
    layers = [module for chunk in chunks for _, module in lora_layers(chunk)]
    states = [module.lora_enabled for module in layers]
    for module in layers:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module, state in zip(layers, states):
            module.lora_enabled = state


def allreduce_partial_adapter_grads(model: list[torch.nn.Module]) -> None:
    """Sums over TP the grads that each TP rank holds only a part of (see the module docstring); a routed
    expert's over the experts' TP group (--expert-tensor-parallel-size ranks, which hold the same experts)."""
    for expert, group in ((False, parallel_state.get_tensor_model_parallel_group()),
                          (True, parallel_state.get_expert_tensor_parallel_group())):
        if dist.get_world_size(group) == 1:
            continue
        grads = []
        for chunk in model:
            for param in chunk.parameters():
                if (param.requires_grad and getattr(param, "tp_partial_grad", False)
                        and getattr(param, "expert_tp_partial_grad", False) == expert):
                    grad = getattr(param, "main_grad", None) if hasattr(param, "main_grad") else param.grad
                    if grad is not None:
                        grads.append(grad)
        if not grads:
            continue
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def parameter_counts(model: list[torch.nn.Module]) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model, summed over TP and PP ranks.

    Replicated tensors count once (on TP rank 0), as megatron's grad-norm does.
    """
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    counts = torch.zeros(2, dtype=torch.float64, device=current_device())
    for chunk in model:
        for param in chunk.parameters():
            if param_is_not_tensor_parallel_duplicate(param):
                counts[1] += param.numel()
                if param.requires_grad:
                    counts[0] += param.numel()
    dist.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    return int(counts[0].item()), int(counts[1].item())
