"""Split a full (TP1 x PP1) megatron-core GPT state dict into per-rank shards, and merge them back.

Used by the HF <-> megatron converters, by resharding, and by the layout-parity tests.
The rules follow megatron-core's tensor-parallel layers: column-parallel weights
(linear_qkv, linear_fc1, vocab embedding, output layer) split on dim 0, row-parallel
weights (linear_proj, linear_fc2) on dim 1, everything else is replicated (a reward model's value_head.weight
too, kept on the last stage). LoRA adapters
(engine/model/lora.py) follow their layer: B of a column-parallel linear and A of a
row-parallel one split like its weight; the other factor is replicated. linear_qkv
is already stored per query group as [q heads | k | v], so a contiguous split keeps
whole groups together. A gated linear_fc1 holds [gate; up], and each TP rank holds
[gate_i; up_i], so the halves are split separately.

Mixture of experts: expert parallel rank e holds routed experts e*n .. e*n+n-1 (n = experts / EP), numbered
from 0 as megatron-core's SequentialMLP names them (`mlp.experts.local_experts.J`); each expert's linears
split like a dense MLP's, over the expert tensor-parallel size ETP (a divisor of TP): the file of TP rank t holds
expert-TP rank t % ETP's slice (whole experts under ETP1), as the training rank that writes it holds. The router
and the shared expert are held by every EP rank (the shared expert split over TP like a dense MLP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from engine.checkpoint.layout import stage_files
from engine.formats import VALUE_HEAD_KEY

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias",
                    "linear_qkv.lora_B.weight", "linear_fc1.lora_B.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight", "linear_proj.lora_A.weight", "linear_fc2.lora_A.weight")
_VOCAB_PARALLEL = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class ShardLayout:
    """How a model is split: TP and PP sizes, virtual stages, and the layers of each pipeline stage."""

    num_layers: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_size: int | None = None
    layers_per_stage: tuple[int, ...] | None = None
    """Uneven PP (--num-layer-list); default an even split. Not combinable with virtual stages."""
    swiglu: bool = True
    tied_embeddings: bool = True
    padded_vocab_size: int | None = None
    """Vocab rows after padding for this layout; vocab tensors are zero-padded or cut to it."""
    expert_model_parallel_size: int = 1
    num_experts: int | None = None
    """Routed experts per MoE layer (None: a dense model)."""
    expert_tensor_parallel_size: int | None = None
    """ETP, a divisor of TP (None: TP)."""

    def __post_init__(self) -> None:
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_size or 1
        if self.layers_per_stage is not None:
            if vpp != 1:
                raise ValueError("an uneven layer list cannot be combined with virtual pipeline stages")
            if len(self.layers_per_stage) != pp or sum(self.layers_per_stage) != self.num_layers:
                raise ValueError(
                    f"--num-layer-list {','.join(map(str, self.layers_per_stage))} must have "
                    f"{pp} entries summing to --num-layers {self.num_layers}"
                )
        elif self.num_layers % (pp * vpp):
            raise ValueError(f"{self.num_layers} layers cannot be split evenly over {pp} x {vpp} stages")
        ep = self.expert_model_parallel_size
        if ep > 1 and (self.num_experts is None or self.num_experts % ep):
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {ep} expert-parallel ranks")
        if self.tensor_model_parallel_size % self.expert_tp:
            raise ValueError(f"expert tensor-parallel size {self.expert_tp} does not divide the tensor-parallel size "
                             f"{self.tensor_model_parallel_size}")

    @property
    def expert_tp(self) -> int:
        """ETP: how many slices each routed expert's linears are cut into."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def files(self) -> list[tuple[int, int]]:
        """The (TP rank, EP rank) rank files of each pipeline stage (engine/checkpoint/layout.py)."""
        return stage_files(self.tensor_model_parallel_size, self.expert_model_parallel_size, self.expert_tp)

    @property
    def local_experts(self) -> int:
        """Routed experts per expert-parallel rank."""
        return (self.num_experts or 0) // self.expert_model_parallel_size

    def stage_layers(self, pp_rank: int, vp_stage: int | None = None) -> range:
        """Global layer indices held by one (pipeline rank, virtual stage)."""
        if self.layers_per_stage is not None:
            start = sum(self.layers_per_stage[:pp_rank])
            return range(start, start + self.layers_per_stage[pp_rank])
        vpp = self.virtual_pipeline_size or 1
        per_chunk = self.num_layers // (self.pipeline_model_parallel_size * vpp)
        start = (vp_stage or 0) * (self.num_layers // vpp) + pp_rank * per_chunk
        return range(start, start + per_chunk)

    def is_first(self, pp_rank: int, vp_stage: int | None) -> bool:
        return pp_rank == 0 and (vp_stage or 0) == 0

    def is_last(self, pp_rank: int, vp_stage: int | None) -> bool:
        last_vp = (self.virtual_pipeline_size or 1) - 1
        return pp_rank == self.pipeline_model_parallel_size - 1 and (vp_stage or 0) == last_vp


def _split_dim(key: str) -> int | None:
    if key.endswith(_COLUMN_PARALLEL) or key in _VOCAB_PARALLEL:
        return 0
    if key.endswith(_ROW_PARALLEL):
        return 1
    return None


def _resize_vocab(tensor: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Padding rows carry no meaning (the loss masks them), so they are cut or zero-filled freely."""
    if rows is None or tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _tp_slice(key: str, tensor: torch.Tensor, tp: int, rank: int, swiglu: bool) -> torch.Tensor:
    dim = _split_dim(key)
    if dim is None or tp == 1:
        return tensor
    if swiglu and "linear_fc1" in key:
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0).clone()
    if tensor.shape[dim] % tp:
        raise ValueError(f"{key} has {tensor.shape[dim]} rows on dim {dim}, not divisible by TP {tp}")
    return tensor.chunk(tp, dim=dim)[rank].clone()


def _tp_merge(key: str, pieces: list[torch.Tensor], swiglu: bool) -> torch.Tensor:
    dim = _split_dim(key)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if swiglu and "linear_fc1" in key:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=dim)


def _expert_key(key: str, offset: int) -> str | None:
    """`key` with its routed expert's index moved by `offset`; None when `key` is no routed expert's."""
    match = _EXPERT_KEY.match(key)
    if match is None:
        return None
    return f"{match.group(1)}{int(match.group(2)) + offset}{match.group(3)}"


def shard_state_dict(
    full: dict[str, torch.Tensor], layout: ShardLayout, tp_rank: int, pp_rank: int, vp_stage: int | None = None,
    ep_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """The state dict of one model chunk on one rank, with layers (and routed experts) renumbered from 0 as
    megatron does."""
    layers = layout.stage_layers(pp_rank, vp_stage)
    first, last = layout.is_first(pp_rank, vp_stage), layout.is_last(pp_rank, vp_stage)
    tp, swiglu = layout.tensor_model_parallel_size, layout.swiglu
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        match = _LAYER_KEY.match(key)
        if match:
            index = int(match.group(1))
            if index not in layers:
                continue
            key = f"decoder.layers.{index - layers.start}.{match.group(2)}"
            expert = _EXPERT_KEY.match(key)
            if expert is not None:
                local = int(expert.group(2)) - ep_rank * layout.local_experts
                if layout.expert_model_parallel_size > 1:
                    if not 0 <= local < layout.local_experts:
                        continue
                    key = f"{expert.group(1)}{local}{expert.group(3)}"
                out[key] = _tp_slice(key, tensor, layout.expert_tp, tp_rank % layout.expert_tp, swiglu)
                continue
        elif key.startswith("embedding."):
            if not first:
                continue
        elif key.startswith(("decoder.final_layernorm", "output_layer", "value_head")):
            if not last:
                continue
        if key in _VOCAB_PARALLEL:
            tensor = _resize_vocab(tensor, layout.padded_vocab_size)
        out[key] = _tp_slice(key, tensor, tp, tp_rank, swiglu)
    if last and layout.tied_embeddings and layout.pipeline_model_parallel_size > 1 and VALUE_HEAD_KEY not in full:
        # The last stage keeps its own copy of the tied embedding as output_layer.weight (a reward model has none).
        embedding = _resize_vocab(full["embedding.word_embeddings.weight"], layout.padded_vocab_size)
        out["output_layer.weight"] = _tp_slice("output_layer.weight", embedding, tp, tp_rank, swiglu)
    return out


def merge_chunk(
    ranks: dict[tuple[int, int], dict[str, torch.Tensor]], layout: ShardLayout, pp_rank: int,
    vp_stage: int | None = None,
) -> dict[str, torch.Tensor]:
    """The shards of one model chunk (all its keys, or any subset such as one layer) -> full tensors.

    `ranks[(tp_rank, ep_rank)]` is the chunk of each rank file of the stage (`layout.files`). Dense tensors
    are merged over TP from the first file of each TP rank; EP rank e's routed experts over ETP from its
    files of expert-TP ranks 0 .. ETP-1. Layers and routed experts are renumbered to global indices;
    `_extra_state` and the tied output-layer copy are dropped.
    """
    layers = layout.stage_layers(pp_rank, vp_stage)
    tp, etp = layout.tensor_model_parallel_size, layout.expert_tp
    first_of_tp: dict[int, dict] = {}
    first_of_slice: dict[tuple[int, int], dict] = {}
    for (t, e), state in sorted(ranks.items()):
        first_of_tp.setdefault(t, state)
        first_of_slice.setdefault((e, t % etp), state)
    dense = [first_of_tp[t] for t in range(tp)]
    full: dict[str, torch.Tensor] = {}
    for key in dense[0]:
        if key.endswith("_extra_state") or (key == "output_layer.weight" and layout.tied_embeddings):
            continue
        if _EXPERT_KEY.match(key) is None:
            full[key] = _tp_merge(key, [r[key] for r in dense], layout.swiglu)
    for ep_rank in range(layout.expert_model_parallel_size):
        group = [first_of_slice[(ep_rank, s)] for s in range(etp)]
        for key in group[0]:
            expert = _expert_key(key, ep_rank * layout.local_experts)
            if expert is not None and not key.endswith("_extra_state"):
                full[expert] = _tp_merge(key, [r[key] for r in group], layout.swiglu)
    return {_global_layer(key, layers.start): tensor for key, tensor in full.items()}


def _global_layer(key: str, start: int) -> str:
    match = _LAYER_KEY.match(key)
    return f"decoder.layers.{int(match.group(1)) + start}.{match.group(2)}" if match else key


def merge_state_dicts(
    shards: dict[tuple[int, ...], dict[str, torch.Tensor]], layout: ShardLayout
) -> dict[str, torch.Tensor]:
    """Inverse of shard_state_dict: `shards[(tp_rank, pp_rank, vp_stage)]` (with `ep_rank` as a fourth entry
    under expert parallelism) for the rank files of `layout.files` -> the full state dict."""
    ep = layout.expert_model_parallel_size
    vp_stages = range(layout.virtual_pipeline_size) if layout.virtual_pipeline_size else [None]
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(layout.pipeline_model_parallel_size):
        for vp_stage in vp_stages:
            ranks = {(t, e): shards[(t, pp_rank, vp_stage) + ((e,) if ep > 1 else ())] for t, e in layout.files}
            full.update(merge_chunk(ranks, layout, pp_rank, vp_stage))
    return full


def select_experts(state: dict[str, torch.Tensor], num_experts: int, ep_size: int,
                   ep_rank: int) -> dict[str, torch.Tensor]:
    """A rank file saved without expert parallelism (all experts) cut to EP rank `ep_rank`'s experts,
    renumbered from 0; every other tensor is kept as it is."""
    if ep_size == 1:
        return dict(state)
    local = num_experts // ep_size
    out = {}
    for key, tensor in state.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            out[key] = tensor
            continue
        index = int(match.group(2)) - ep_rank * local
        if 0 <= index < local:
            out[f"{match.group(1)}{index}{match.group(3)}"] = tensor
    return out
