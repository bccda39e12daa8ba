"""The two spellings of one model's state dict: megatron-core's local spec and its transformer-engine spec.

The TE spec fuses each dense layer's two norms into the linear that follows them
(TELayerNormColumnParallelLinear, whose `layer_norm_weight` / `layer_norm_bias` are TE's
LayerNormLinear parameters; RMSNorm has no bias) and leaves `input_layernorm` / `pre_mlp_layernorm`
as IdentityOp. Everything else has one name in both: the q/k norms (`self_attention.q_layernorm.weight`,
TENorm or our Norm), the final norm, linear weights and biases. megatron-core's own local spec declares
the same correspondence as its `sharded_state_dict_keys_map` (gpt_layer_specs.py, 0.15-0.19):

    local (decoder.layers.N.)         TE (decoder.layers.N.)
    input_layernorm.{weight,bias}     self_attention.linear_qkv.layer_norm_{weight,bias}
    pre_mlp_layernorm.{weight,bias}   mlp.linear_fc1.layer_norm_{weight,bias}

`<module>._extra_state` entries keep their names: megatron's local linears save one too (None, ignored on
load) and TE's linears accept None; only TE's core attention has one the local model lacks, which
`match_spelling` drops (fp8 metadata, meaningless to local layers).

Both the converters (either spelling in, either out) and the trainer's `--load` (the model's own
spelling decides) use `to_spelling`; a norm is fused only into a linear that is there (an MoE layer has
no linear_fc1 and keeps its pre_mlp_layernorm, as megatron's TE spec does).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, TypeVar

_FUSED = (  # (local module, TE module holding it)
    ("input_layernorm", "self_attention.linear_qkv"),
    ("pre_mlp_layernorm", "mlp.linear_fc1"),
)
_LAYER = re.compile(r"^(.*?layers\.\d+)\.(.+)$")
_TE_NORM = re.compile(r"\.(?:self_attention\.linear_qkv|mlp\.linear_fc1)\.layer_norm_(?:weight|bias)$")
_LOCAL_NORM = re.compile(r"\.(?:input_layernorm|pre_mlp_layernorm)\.(?:weight|bias)$")

V = TypeVar("V")


def te_spelling(keys: Iterable[str]) -> bool | None:
    """True for TE names, False for local names, None when the keys hold no decoder layer norm (e.g. the
    embedding alone). Raises on a mix, which no megatron model produces."""
    te = local = False
    for key in keys:
        te = te or bool(_TE_NORM.search(key))
        local = local or (bool(_LOCAL_NORM.search(key)) and not key.endswith("_extra_state"))
    if te and local:
        raise ValueError("a state dict with both TE-fused norms (linear_qkv.layer_norm_weight) and local norms "
                         "(input_layernorm.weight): not a megatron-core model")
    return True if te else False if local else None


def to_spelling(state_dict: Mapping[str, V], te: bool) -> dict[str, V]:
    """`state_dict` under the TE spec's names (te=True) or the local spec's (te=False), whichever it uses now.

    Pure renaming: values are passed through (no copies), the order of keys is kept. To TE, a norm moves into
    the linear after it only when that linear's weight is in the same state dict.
    """
    keys = set(state_dict)
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        match = _LAYER.match(key)
        if match is None:
            out[key] = value
            continue
        layer, name = match.groups()
        for norm, linear in _FUSED:
            if te and name.startswith(norm + ".") and f"{layer}.{linear}.weight" in keys:
                name = f"{linear}.layer_norm_{name[len(norm) + 1:]}"
                break
            if not te and name.startswith(linear + ".layer_norm_"):
                name = f"{norm}.{name[len(linear) + len('.layer_norm_'):]}"
                break
        out[f"{layer}.{name}"] = value
    return out


def match_spelling(state_dict: Mapping[str, V], model_keys: Iterable[str]) -> dict[str, V]:
    """`state_dict` in the spelling of the model whose state-dict keys are `model_keys` (names unchanged when
    the model's keys name no decoder norm, e.g. a stage of embeddings only); `_extra_state` entries the model
    does not have (TE attention's, loaded into a local model) are dropped."""
    model_keys = set(model_keys)
    te = te_spelling(model_keys)
    renamed = dict(state_dict) if te is None else to_spelling(state_dict, te)
    return {k: v for k, v in renamed.items() if not k.endswith("_extra_state") or k in model_keys}
