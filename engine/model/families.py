"""The one model-family registry: HF identity, architecture flags and HF tensor names per family.

The converters, the flag printer and the model builder all read this table, so adding a
family is one new `ModelFamily` entry (plus an `HFNames` table when its HF checkpoint
names tensors differently). Everything here is data or a pure function of an HF
`config.json` dict: no torch, no transformers import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.arguments import moe_layer_freq_text, moe_layer_pattern


class UnsupportedModelError(ValueError):
    """An HF model this project cannot convert or build; the message lists what is supported."""


@dataclass(frozen=True)
class HFNames:
    """Tensor names of one decoder family's HF checkpoint (per layer: relative to `layer_prefix`)."""

    embedding: str = "model.embed_tokens.weight"
    """Token embedding [vocab, hidden]."""
    final_norm: str = "model.norm.weight"
    """Norm after the last layer."""
    output: str = "lm_head.weight"
    """Output projection [vocab, hidden]; absent when embeddings are tied."""
    layer_prefix: str = "model.layers.{}."
    """Prefix of layer N's tensors (formatted with the layer index)."""
    input_norm: str = "input_layernorm.weight"
    """Norm before attention."""
    q: str = "self_attn.q_proj"
    """Query projection (.weight, .bias)."""
    k: str = "self_attn.k_proj"
    """Key projection (.weight, .bias)."""
    v: str = "self_attn.v_proj"
    """Value projection (.weight, .bias)."""
    o: str = "self_attn.o_proj.weight"
    """Attention output projection."""
    q_norm: str = "self_attn.q_norm.weight"
    """Per-head query RMSNorm (qk-norm families)."""
    k_norm: str = "self_attn.k_norm.weight"
    """Per-head key RMSNorm (qk-norm families)."""
    post_norm: str = "post_attention_layernorm.weight"
    """Norm before the MLP."""
    gate: str = "mlp.gate_proj.weight"
    """SwiGLU gate projection (first half of megatron's linear_fc1)."""
    up: str = "mlp.up_proj.weight"
    """SwiGLU up projection (second half of megatron's linear_fc1)."""
    down: str = "mlp.down_proj.weight"
    """MLP output projection."""
    router: str = "mlp.gate.weight"
    """MoE router [experts, hidden] (MoE families)."""
    expert: str = "mlp.experts.{}."
    """Prefix of routed expert E's projections (formatted with the expert index): one tensor per projection."""
    expert_gate: str = "gate_proj.weight"
    """A routed expert's gate projection (first half of its linear_fc1)."""
    expert_up: str = "up_proj.weight"
    """A routed expert's up projection (second half of its linear_fc1)."""
    expert_down: str = "down_proj.weight"
    """A routed expert's output projection (its linear_fc2)."""
    shared_expert: str = "mlp.shared_expert."
    """Prefix of the shared expert's gate_proj / up_proj / down_proj (Qwen2-MoE)."""
    shared_expert_gate: str = "mlp.shared_expert_gate.weight"
    """The shared expert's sigmoid gate [1, hidden] (Qwen2-MoE)."""
    experts: str = "mlp.experts"
    """The module transformers 5 builds for a layer's routed experts, whatever the checkpoint's names (Mixtral's
    included): 3D parameters gate_up_proj [experts, 2 x ffn, hidden] ([gate; up] rows) and down_proj
    [experts, hidden, ffn], which a PEFT adapter addresses through `target_parameters`."""

    def layer(self, index: int, name: str) -> str:
        return self.layer_prefix.format(index) + name


LLAMA_NAMES = HFNames()
MIXTRAL_NAMES = HFNames(router="block_sparse_moe.gate.weight", expert="block_sparse_moe.experts.{}.",
                        expert_gate="w1.weight", expert_up="w3.weight", expert_down="w2.weight")


@dataclass(frozen=True)
class ModelFamily:
    """One decoder family as HF stores it and as megatron-core builds it."""

    name: str
    """--model-type-hf value (llama2, llama3, mistral, qwen2, qwen3)."""
    model_type: str
    """HF config.json `model_type`."""
    architecture: str
    """HF config.json `architectures[0]`."""
    config_class: str
    """transformers config class written by mg -> hf."""
    names: HFNames = LLAMA_NAMES
    """HF tensor names."""
    qkv_bias: bool = False
    """Always has q/k/v biases (Qwen2), whatever config.json says."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys (Qwen3)."""
    moe: bool = False
    """Decoder layers' MLPs are mixtures of experts (a router and routed experts); Qwen-MoE configs can make some
    layers dense (decoder_sparse_step, mlp_only_layers: --moe-layer-freq)."""
    shared_expert: bool = False
    """MoE layers also have a shared expert with a sigmoid gate (Qwen2-MoE)."""


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily("llama2", "llama", "LlamaForCausalLM", "LlamaConfig"),
        ModelFamily("llama3", "llama", "LlamaForCausalLM", "LlamaConfig"),
        ModelFamily("mistral", "mistral", "MistralForCausalLM", "MistralConfig"),
        ModelFamily("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config", qkv_bias=True),
        ModelFamily("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config", qk_norm=True),
        ModelFamily("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", qk_norm=True, moe=True),
        ModelFamily("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", qkv_bias=True, moe=True,
                    shared_expert=True),
        ModelFamily("mixtral", "mixtral", "MixtralForCausalLM", "MixtralConfig", names=MIXTRAL_NAMES, moe=True),
    )
}


def _supported() -> str:
    return ", ".join(f"{f.name} (model_type {f.model_type})" for f in FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unsupported model family {name!r}; supported: {_supported()}")
    return FAMILIES[name]


def detect_family(hf_config: dict) -> ModelFamily:
    """The family of an HF config.json; Llama 2 and 3 share a model_type and differ only in rope scaling."""
    model_type = hf_config.get("model_type")
    if model_type == "llama":
        return FAMILIES["llama3" if _rope_scaling(hf_config) is not None else "llama2"]
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise UnsupportedModelError(f"unsupported HF model_type {model_type!r}; supported: {_supported()}")


def _rope(hf_config: dict) -> dict:
    """transformers 5 nests rope settings in `rope_parameters`; 4.x wrote `rope_theta` / `rope_scaling`."""
    return dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})


def _rope_scaling(hf_config: dict) -> dict | None:
    rope = _rope(hf_config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    return None if kind == "default" else rope


def model_args(family: ModelFamily, hf_config: dict) -> dict[str, Any]:
    """ModelConfig field values (engine/arguments.py names) of an HF config; raises on unsupported features."""
    get = hf_config.get
    if get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {get('hidden_act')!r}: only silu (SwiGLU) MLPs are supported")
    if get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported (megatron-core biases all or no linears)")
    if get("attention_bias") and not family.qkv_bias:
        raise UnsupportedModelError("attention_bias=true (o_proj bias) is not supported; only q/k/v biases are")
    heads = get("num_attention_heads")
    groups = get("num_key_value_heads") or heads
    scaling = _rope_scaling(hf_config)
    args: dict[str, Any] = {
        "num_layers": get("num_hidden_layers"),
        "hidden_size": get("hidden_size"),
        "ffn_hidden_size": get("intermediate_size"),
        "num_attention_heads": heads,
        "group_query_attention": groups != heads,
        "num_query_groups": groups,
        "kv_channels": get("head_dim") or get("hidden_size") // heads,
        "max_position_embeddings": get("max_position_embeddings"),
        "rotary_base": int(_rope(hf_config).get("rope_theta", get("rope_theta", 10000))),
        "rope_scaling_type": None,
        "normalization": "RMSNorm",
        "norm_epsilon": get("rms_norm_eps", 1e-6),
        "swiglu": True,
        "disable_bias_linear": True,
        "add_qkv_bias": family.qkv_bias,
        "qk_layernorm": family.qk_norm,
        "untie_embeddings_and_output_weights": not get("tie_word_embeddings", False),
        "vocab_size": get("vocab_size"),
    }
    if scaling is not None:
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise UnsupportedModelError(f"rope scaling {scaling!r}: only llama3 scaling is supported")
        args.update(
            rope_scaling_type="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if family.moe:
        args.update(_moe_args(family, hf_config))
    missing = [k for k, v in args.items() if v is None and k not in ("rope_scaling_type",)]
    if missing:
        raise UnsupportedModelError(f"config.json lacks {', '.join(missing)}")
    return args


def _moe_args(family: ModelFamily, hf_config: dict) -> dict[str, Any]:
    """MoEConfig field values of an MoE family's config.json.

    Routing: Mixtral and Qwen3-MoE (norm_topk_prob true) softmax over the top k logits, which equals megatron's
    default (top k, then softmax); Qwen2-MoE (norm_topk_prob false) keeps the top k of a softmax over all
    experts: megatron's --moe-router-pre-softmax.
    """
    get = hf_config.get
    normalized = family.name == "mixtral" or get("norm_topk_prob", False)
    args: dict[str, Any] = {
        # Published Qwen-MoE configs say num_experts; transformers 5 writes num_local_experts for all three.
        "num_experts": get("num_local_experts") or get("num_experts"),
        "moe_ffn_hidden_size": get("intermediate_size") if family.name == "mixtral" else get("moe_intermediate_size"),
        "moe_router_topk": get("num_experts_per_tok"),
        "moe_router_pre_softmax": not normalized,
    }
    if family.shared_expert:
        args["moe_shared_expert_intermediate_size"] = get("shared_expert_intermediate_size")
        args["moe_shared_expert_gate"] = True
    pattern = _hf_moe_layers(family, hf_config)
    if not all(pattern):
        args["moe_layer_freq"] = pattern
    return args


def _hf_moe_layers(family: ModelFamily, hf_config: dict) -> list[int]:
    """1 for each MoE layer, 0 for each dense MLP layer, as transformers' Qwen2-MoE / Qwen3-MoE decoder layers
    choose: layer i (from 0) is MoE unless listed in `mlp_only_layers`, and only if (i + 1) is a multiple of
    `decoder_sparse_step`. Mixtral has no dense layers."""
    layers = hf_config.get("num_hidden_layers") or 0
    if family.name == "mixtral":
        return [1] * layers
    step = hf_config.get("decoder_sparse_step") or 1
    dense = set(hf_config.get("mlp_only_layers") or ())
    if not isinstance(step, int) or step < 1:
        raise UnsupportedModelError(f"decoder_sparse_step {step!r}: expected an integer >= 1")
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    if not any(pattern):
        raise UnsupportedModelError(f"decoder_sparse_step {step} and mlp_only_layers {sorted(dense)} leave no MoE "
                                    f"layer among {layers}: a Qwen-MoE model without MoE layers is not supported")
    return pattern


def _hf_sparse_fields(family: ModelFamily, pattern: list[int]) -> dict[str, Any]:
    """Inverse of `_hf_moe_layers`: the decoder_sparse_step (with no mlp_only_layers) that gives `pattern`, else
    decoder_sparse_step 1 with the dense layers listed in mlp_only_layers."""
    if family.name == "mixtral":
        if not all(pattern):
            raise UnsupportedModelError("Mixtral has an MoE MLP in every layer: --moe-layer-freq with dense layers "
                                        "cannot be written as a Mixtral config")
        return {}
    for step in range(1, len(pattern) + 1):
        if pattern == [int((i + 1) % step == 0) for i in range(len(pattern))]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe]}


_FLAG_ORDER = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels", "max_position_embeddings", "rotary_base", "rope_scaling_type",
    "rope_scaling_factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
    "normalization", "norm_epsilon", "swiglu", "disable_bias_linear", "add_qkv_bias", "qk_layernorm",
    "untie_embeddings_and_output_weights", "vocab_size", "make_vocab_size_divisible_by", "padded_vocab_size",
    "num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_layer_freq",
)


def pretrain_flags(args: dict[str, Any]) -> list[str]:
    """The pretrain_dpo.py model flags (Megatron-LM names) that rebuild the architecture in `args`."""
    flags: list[str] = []
    for key in _FLAG_ORDER:
        value = args.get(key)
        if value is None or value is False:
            continue
        if key == "num_query_groups" and not args.get("group_query_attention"):
            continue
        if key == "moe_layer_freq":
            pattern = moe_layer_pattern(value, args["num_layers"])
            if all(pattern):  # megatron's default: every layer
                continue
            value = moe_layer_freq_text(pattern)
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def hf_config_kwargs(family: ModelFamily, args: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of the family's transformers config class for the architecture in `args`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(args["rotary_base"])}
    if args.get("rope_scaling_type") == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(args["rotary_base"]),
            "factor": args["rope_scaling_factor"],
            "low_freq_factor": args["low_freq_factor"],
            "high_freq_factor": args["high_freq_factor"],
            "original_max_position_embeddings": args["original_max_position_embeddings"],
        }
    kwargs: dict[str, Any] = {
        "architectures": [family.architecture],
        "vocab_size": args["vocab_size"],
        "hidden_size": args["hidden_size"],
        "intermediate_size": args["ffn_hidden_size"],
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_attention_heads"],
        "num_key_value_heads": args["num_query_groups"],
        "head_dim": args["kv_channels"],
        "max_position_embeddings": args["max_position_embeddings"],
        "rms_norm_eps": args["norm_epsilon"],
        "hidden_act": "silu",
        "rope_parameters": rope,
        "tie_word_embeddings": not args["untie_embeddings_and_output_weights"],
    }
    if family.moe:
        topk_normalized = not args["moe_router_pre_softmax"]
        if family.name == "mixtral":
            if not topk_normalized:
                raise UnsupportedModelError("Mixtral normalizes its top-k routing weights: no --moe-router-pre-softmax")
            kwargs.update(num_local_experts=args["num_experts"], intermediate_size=args["moe_ffn_hidden_size"])
        else:
            kwargs.update(num_experts=args["num_experts"], moe_intermediate_size=args["moe_ffn_hidden_size"],
                          norm_topk_prob=topk_normalized)
        kwargs.update(_hf_sparse_fields(family, moe_layer_pattern(args.get("moe_layer_freq", 1), args["num_layers"])))
        kwargs["num_experts_per_tok"] = args["moe_router_topk"]
        if family.shared_expert:
            kwargs["shared_expert_intermediate_size"] = args["moe_shared_expert_intermediate_size"]
    if not family.qkv_bias:
        kwargs["attention_bias"] = False
    if family.model_type in ("mistral", "qwen2", "mixtral"):
        # megatron-core attends over the whole context; the HF model must too.
        kwargs["sliding_window"] = None
    return kwargs
