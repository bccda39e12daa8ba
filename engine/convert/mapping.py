"""HF <-> megatron-core tensor mapping for the Llama-style families of engine/model/families.py.

Works on *full* (TP1 x PP1) megatron tensors, one unit at a time: the embedding, one
decoder layer, or the final norm with the output layer. Sharding over TP/PP is
engine/checkpoint/sharding.py's job. Two layouts differ from HF:
- linear_qkv stacks, per query group g, [q heads of g ; k_g ; v_g] (weight rows and bias);
- linear_fc1 is [gate ; up].
HF's rotary embedding and megatron-core's default rope share the rotate-half
convention, so q/k rows need no permutation (the logits-parity test checks this).
Megatron tensors come in either spelling of engine/model/spelling.py (local norms, or TE's
norms fused into linear_qkv / linear_fc1): read in either, written in the one asked for.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from engine.arguments import moe_layer_pattern
from engine.formats import VALUE_HEAD_KEY
from engine.model.families import HFNames, ModelFamily
from engine.model.spelling import to_spelling

Reader = Callable[[str, tuple[int, ...]], torch.Tensor]
"""Reads one HF tensor by name, checking it has the given shape."""

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
SCORE = "score.weight"
"""HF `*ForSequenceClassification`'s head [num_labels, hidden]: a reward model's value head (num_labels 1)."""
CLASSIFIER_SUFFIX = "ForSequenceClassification"


def classifier_architecture(family: ModelFamily) -> str:
    """The family's transformers sequence classifier (LlamaForCausalLM -> LlamaForSequenceClassification)."""
    return family.architecture.removesuffix("ForCausalLM") + CLASSIFIER_SUFFIX


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v (weights [n*d, hidden] or biases [n*d]) -> megatron's per-group [q heads | k | v] rows."""
    tail = q.shape[1:]
    q, k, v = (t.reshape(groups, -1, *tail) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def unpack_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Inverse of pack_qkv: megatron's linear_qkv -> contiguous HF q, k, v."""
    tail = qkv.shape[1:]
    per_group = heads // groups * head_dim
    grouped = qkv.reshape(groups, per_group + 2 * head_dim, *tail)
    q, k, v = grouped.split([per_group, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *tail).clone() for t in (q, k, v))


def _layer(index: int, name: str) -> str:
    return f"decoder.layers.{index}.{name}"


def _moe_from_hf(hf: Reader, names: HFNames, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One layer's MoE tensors, megatron names relative to the layer: the router, each routed expert's
    [gate; up] linear_fc1 and its linear_fc2 (HF stores one tensor per expert projection), the shared expert."""
    hidden, experts, ffn = args["hidden_size"], args["num_experts"], args["moe_ffn_hidden_size"]
    out = {"mlp.router.weight": hf(names.router, (experts, hidden))}
    for e in range(experts):
        prefix = names.expert.format(e)
        out[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
            [hf(prefix + names.expert_gate, (ffn, hidden)), hf(prefix + names.expert_up, (ffn, hidden))])
        out[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = hf(prefix + names.expert_down, (hidden, ffn))
    shared = args.get("moe_shared_expert_intermediate_size")
    if shared:
        out["mlp.shared_experts.linear_fc1.weight"] = torch.cat(
            [hf(names.shared_expert + "gate_proj.weight", (shared, hidden)),
             hf(names.shared_expert + "up_proj.weight", (shared, hidden))])
        out["mlp.shared_experts.linear_fc2.weight"] = hf(names.shared_expert + "down_proj.weight", (hidden, shared))
        if args.get("moe_shared_expert_gate"):
            out["mlp.shared_experts.gate_weight"] = hf(names.shared_expert_gate, (1, hidden))
    return out


def _moe_to_hf(name: str, tensor: torch.Tensor, names: HFNames) -> dict[str, torch.Tensor] | None:
    """Inverse of `_moe_from_hf` for one megatron tensor (name relative to its layer); None if not an MoE one."""
    if name == "mlp.router.weight":
        return {names.router: tensor}
    if name == "mlp.shared_experts.gate_weight":
        return {names.shared_expert_gate: tensor}
    if name.startswith("mlp.experts.local_experts."):
        index, linear = name[len("mlp.experts.local_experts."):].split(".", 1)
        prefix = names.expert.format(int(index))
        gate, up, down = names.expert_gate, names.expert_up, names.expert_down
    elif name.startswith("mlp.shared_experts."):
        linear, prefix = name[len("mlp.shared_experts."):], names.shared_expert
        gate, up, down = "gate_proj.weight", "up_proj.weight", "down_proj.weight"
    else:
        return None
    if linear == "linear_fc1.weight":
        first, second = tensor.chunk(2, dim=0)
        return {prefix + gate: first.clone(), prefix + up: second.clone()}
    if linear == "linear_fc2.weight":
        return {prefix + down: tensor}
    return None


def hf_to_mcore_units(read: Reader, family: ModelFamily, args: dict[str, Any],
                      te: bool = False, value_head: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Full megatron tensors in stream order: embedding, each layer, final norm (+ untied output layer, or with
    `value_head` a sequence classifier's score as the reward model's value head); layers under the TE spec's
    names when `te`. An MoE model's dense layers (--moe-layer-freq) hold a dense family's MLP of
    --ffn-hidden-size (HF's intermediate_size; its experts have moe_intermediate_size)."""
    names = family.names
    hidden, vocab, ffn = args["hidden_size"], args["vocab_size"], args["ffn_hidden_size"]
    heads, groups, head_dim = args["num_attention_heads"], args["num_query_groups"], args["kv_channels"]
    yield {EMBEDDING: read(names.embedding, (vocab, hidden))}
    moe_layers = moe_layer_pattern(args.get("moe_layer_freq", 1) if args.get("num_experts") else [0] * args["num_layers"],
                                   args["num_layers"])
    for i in range(args["num_layers"]):
        hf = lambda name, shape: read(names.layer(i, name), shape)  # noqa: E731 - binds layer i
        unit = {
            _layer(i, "input_layernorm.weight"): hf(names.input_norm, (hidden,)),
            _layer(i, "self_attention.linear_qkv.weight"): pack_qkv(
                hf(f"{names.q}.weight", (heads * head_dim, hidden)),
                hf(f"{names.k}.weight", (groups * head_dim, hidden)),
                hf(f"{names.v}.weight", (groups * head_dim, hidden)),
                groups,
            ),
            _layer(i, "self_attention.linear_proj.weight"): hf(names.o, (hidden, heads * head_dim)),
            _layer(i, "pre_mlp_layernorm.weight"): hf(names.post_norm, (hidden,)),
        }
        if moe_layers[i]:
            unit.update({_layer(i, k): v for k, v in _moe_from_hf(hf, names, args).items()})
        else:
            unit[_layer(i, "mlp.linear_fc1.weight")] = torch.cat([hf(names.gate, (ffn, hidden)),
                                                                  hf(names.up, (ffn, hidden))])
            unit[_layer(i, "mlp.linear_fc2.weight")] = hf(names.down, (hidden, ffn))
        if args["add_qkv_bias"]:
            unit[_layer(i, "self_attention.linear_qkv.bias")] = pack_qkv(
                hf(f"{names.q}.bias", (heads * head_dim,)),
                hf(f"{names.k}.bias", (groups * head_dim,)),
                hf(f"{names.v}.bias", (groups * head_dim,)),
                groups,
            )
        if args["qk_layernorm"]:
            unit[_layer(i, "self_attention.q_layernorm.weight")] = hf(names.q_norm, (head_dim,))
            unit[_layer(i, "self_attention.k_layernorm.weight")] = hf(names.k_norm, (head_dim,))
        yield to_spelling(unit, te) if te else unit
    final = {FINAL_NORM: read(names.final_norm, (hidden,))}
    if value_head:
        final[VALUE_HEAD_KEY] = read(SCORE, (1, hidden))
    elif args["untie_embeddings_and_output_weights"]:
        final[OUTPUT] = read(names.output, (vocab, hidden))
    yield final


def mcore_to_hf_unit(unit: dict[str, torch.Tensor], family: ModelFamily, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One stream unit of full megatron tensors, in either spelling -> HF tensors (contiguous, not sharing storage)."""
    unit = to_spelling(unit, te=False)
    names = family.names
    heads, groups, head_dim = args["num_attention_heads"], args["num_query_groups"], args["kv_channels"]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in unit.items():
        if key == EMBEDDING:
            out[names.embedding] = tensor
        elif key == FINAL_NORM:
            out[names.final_norm] = tensor
        elif key == OUTPUT:
            out[names.output] = tensor
        elif key == VALUE_HEAD_KEY:
            out[SCORE] = tensor
        else:
            _, _, index, name = key.split(".", 3)
            hf = lambda n: names.layer(int(index), n)  # noqa: E731 - binds this layer
            if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                suffix = name.rsplit(".", 1)[1]
                q, k, v = unpack_qkv(tensor, heads, groups, head_dim)
                out.update({hf(f"{names.q}.{suffix}"): q, hf(f"{names.k}.{suffix}"): k, hf(f"{names.v}.{suffix}"): v})
            elif (moe := _moe_to_hf(name, tensor, names)) is not None:
                out.update({hf(k): v for k, v in moe.items()})
            elif name == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2, dim=0)
                out.update({hf(names.gate): gate.clone(), hf(names.up): up.clone()})
            else:
                hf_name = {
                    "input_layernorm.weight": names.input_norm,
                    "self_attention.linear_proj.weight": names.o,
                    "pre_mlp_layernorm.weight": names.post_norm,
                    "mlp.linear_fc2.weight": names.down,
                    "self_attention.q_layernorm.weight": names.q_norm,
                    "self_attention.k_layernorm.weight": names.k_norm,
                }.get(name)
                if hf_name is None:
                    raise KeyError(f"no HF name for megatron tensor {key}")
                out[hf(hf_name)] = tensor
    return {k: v.contiguous() for k, v in out.items()}
