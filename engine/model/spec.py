"""Layer specs: the model's structure declared as megatron ModuleSpecs, chosen in one function.

Backends:
- transformer_engine: megatron-core's TE spec (fused norm+linear, TE attention), when TE imports
  (engine/model/compat.py detects it and makes the call).
- local: megatron-core's tensor-parallel linears with this project's Norm (HF-exact math,
  sequence-parallel capable) and SDPA core attention (or megatron's unfused attention);
  with LoRA, the targeted linears are engine/model/lora.py's subclasses.

LoRA adapts the local spec's linears; TE's fused LayerNormLinear modules have none to adapt, so a LoRA
run takes the local spec under --transformer-impl auto (one log line says so) and refuses an explicit
--transformer-impl transformer_engine.
"""

from __future__ import annotations

import dataclasses
import logging

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from engine.arguments import moe_layer_pattern
from engine.model import compat
from engine.model.attention import SDPAttention
from engine.model.lora import LoraColumnParallelLinear, LoraRowParallelLinear, LoraSettings
from engine.model.norm import Norm
from engine.model.router import SequenceZLossRouter

logger = logging.getLogger(__name__)


def resolve_transformer_impl(requested: str, lora: bool = False, shared_prompt: bool = False) -> str:
    """The layer spec of a run: 'auto' is TE when it can be built here, except under LoRA or --shared-prompt
    (local, logged); an explicit transformer_engine without TE is an error, not a fallback (with LoRA or
    --shared-prompt, flag validation refuses it: engine.arguments.validate)."""
    if requested == "auto":
        if not compat.transformer_engine_available():
            return "local"
        if lora or shared_prompt:
            logger.info("--transformer-impl auto: local layer spec, not transformer_engine, because %s",
                        "LoRA (--lora-r) adapts megatron-core's local linears" if lora else
                        "--shared-prompt's attention (rejected answers skip the chosen ones) runs in the local "
                        "spec's SDPA attention")
            return "local"
        return "transformer_engine"
    if requested == "transformer_engine" and not compat.transformer_engine_available():
        raise ValueError(f"--transformer-impl transformer_engine, but {compat.transformer_engine_status()[1]}")
    return requested


def _linear(base: type, name: str, lora: LoraSettings | None, targets: tuple[str, ...]) -> type | ModuleSpec:
    """The base linear, or its LoRA subclass when `name` is a --lora-target-modules entry."""
    if lora is None or name not in targets:
        return base
    return ModuleSpec(module=LoraColumnParallelLinear if base is ColumnParallelLinear else LoraRowParallelLinear,
                      params={"lora": lora})


def _mlp_submodules(lora: LoraSettings | None, targets: tuple[str, ...]) -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=_linear(ColumnParallelLinear, "linear_fc1", lora, targets),
                         linear_fc2=_linear(RowParallelLinear, "linear_fc2", lora, targets))


def moe_spec(lora: LoraSettings | None = None, lora_targets: tuple[str, ...] = ()) -> ModuleSpec:
    """megatron-core's MoE layer on local linears: its router, its token dispatcher, the routed experts as
    one MLP each (SequentialMLP: each expert keeps its own linear_fc1/linear_fc2, so LoRA gives each its
    own adapters) and the shared expert (built only with --moe-shared-expert-intermediate-size); the router is
    the engine's (`SequenceZLossRouter`: the z-loss over the whole sequence, in every layout)."""
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=SequentialMLP, submodules=_mlp_submodules(lora, lora_targets)),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=_mlp_submodules(lora, lora_targets)),
            router=SequenceZLossRouter,
        ),
    )


def with_engine_router(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """`block` (megatron-core's TE decoder block) with every MoE layer building `SequenceZLossRouter`.

    The layer specs are copied, not edited: megatron may share one spec object between layers or calls."""
    layers = []
    for layer in block.layer_specs:
        mlp = layer.submodules.mlp
        if isinstance(mlp, ModuleSpec) and isinstance(mlp.submodules, MoESubmodules):
            mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=SequenceZLossRouter))
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
        layers.append(layer)
    return dataclasses.replace(block, layer_specs=layers)


def local_layer_spec(qk_layernorm: bool, attention_backend: str, lora: LoraSettings | None = None,
                     lora_targets: tuple[str, ...] = (), moe: bool = False) -> ModuleSpec:
    core_attention = DotProductAttention if attention_backend == "unfused" else SDPAttention
    mlp = moe_spec(lora, lora_targets) if moe else ModuleSpec(module=MLP,
                                                              submodules=_mlp_submodules(lora, lora_targets))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_linear(ColumnParallelLinear, "linear_qkv", lora, lora_targets),
                    core_attention=core_attention,
                    linear_proj=_linear(RowParallelLinear, "linear_proj", lora, lora_targets),
                    q_layernorm=Norm if qk_layernorm else IdentityOp,
                    k_layernorm=Norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(
    config: TransformerConfig, transformer_impl: str, attention_backend: str, vp_stage: int | None,
    lora: LoraSettings | None = None, lora_targets: tuple[str, ...] = (),
) -> ModuleSpec:
    """The decoder of one pipeline (or virtual pipeline) stage; LoRA adapts the local spec's linears.

    Under --moe-layer-freq some layers are dense: the pattern indexes the whole model's layers, and this
    stage builds its slice of it (from megatron's layer offset of the stage, as get_gpt_decoder_block_spec does).
    """
    if transformer_impl == "transformer_engine":
        if lora is not None:
            raise ValueError("LoRA adapts megatron-core's local linears: use --transformer-impl local")
        return with_engine_router(compat.te_decoder_block_spec(config, vp_stage))
    if config.moe_grouped_gemm:
        raise ValueError("--moe-grouped-gemm runs the experts through transformer-engine's grouped GEMM: use "
                         "--transformer-impl transformer_engine on CUDA, or drop the flag (the local spec runs "
                         "each expert as its own MLP)")
    specs = [local_layer_spec(config.qk_layernorm, attention_backend, lora, lora_targets, moe=moe)
             for moe in (False, True)]
    pattern = moe_layers(config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    stage = range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage))
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[specs[pattern[i]] for i in stage], layer_norm=Norm),
    )


def moe_layers(config: TransformerConfig) -> list[int]:
    """1 for each MoE layer of the whole model, 0 for each dense one (megatron-core's reading of moe_layer_freq)."""
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    return moe_layer_pattern(config.moe_layer_freq, config.num_layers)
