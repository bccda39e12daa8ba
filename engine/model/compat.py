"""What differs between the megatron-core and transformer-engine versions the engine supports, in one place.

Read from megatron-core source at tags core_v0.15.0, 0.15.3, 0.16.1, 0.17.1, 0.18.2 and 0.19.0 (CPU CI runs
0.16.1 only; GPU users on Python >= 3.12 get up to 0.19.x):
- `get_gpt_decoder_block_spec(config, use_transformer_engine, normalization=None, qk_l2_norm=False,
  vp_stage=None, pp_rank=None)` in every one of them. It takes no `qk_layernorm`: it reads
  `config.qk_layernorm` itself. With TE it builds `TELayerNormColumnParallelLinear` for linear_qkv and
  linear_fc1 (the input and pre-MLP norms fused into them, `input_layernorm` / `pre_mlp_layernorm` left
  `IdentityOp` for dense layers), `TEDotProductAttention`, `TENorm` for the q/k norms and the final norm.
- megatron's TE classes exist only when its own `import transformer_engine` and its
  `megatron.core.extensions.transformer_engine` import (which needs `transformer_engine.pytorch`)
  succeeded: `gpt_layer_specs.HAVE_TE`. Without them the TE branch raises NameError (TENorm).
- RoPE fusion needs TE's fused kernel: megatron exposes it as
  `rope_utils.fused_apply_rotary_pos_emb` (None without TE) and refuses `apply_rope_fusion` otherwise.
- Gradient-accumulation fusion needs apex's `fused_weight_gradient_mlp_cuda` extension even on a TE
  machine: megatron's own ColumnParallelLinear (the output layer) raises RuntimeError without it
  (`tensor_parallel.layers._grad_accum_fusion_available`).
- The TransformerConfig fields the provider sets exist in all six versions.
- From 0.16 on, `MoESubmodules.router` names the router class an MoE layer builds (0.15 builds `TopKRouter`
  itself), and `TopKRouter.routing` calls `self.apply_z_loss(logits, padding_mask=padding_mask)`: the engine's
  router (`MEGATRON_CORE_CORRECTIONS`) overrides that method, whose arguments are the same in 0.16.1 to 0.19.0.

Nothing here imports transformer_engine or a megatron-core API at module import: each check is a
function, so a test can monkeypatch it and a CPU machine never touches TE.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE = ((0, 15), (0, 19))
"""Oldest and newest megatron-core minor versions whose source was read for this module (inclusive)."""

TE_BLOCK_SPEC_PARAMETERS = ("config", "use_transformer_engine", "normalization", "vp_stage")
"""The parameters of get_gpt_decoder_block_spec that te_decoder_block_spec passes."""

FUSION_FIELDS = ("bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "persist_layer_norm",
                 "apply_rope_fusion", "gradient_accumulation_fusion")
"""TransformerConfig fields engine/model/provider.py sets."""

MEGATRON_CORE_CORRECTIONS = (
    "megatron.core.transformer.moe.router.TopKRouter.apply_z_loss -> engine.model.router.SequenceZLossRouter "
    "(every device, through MoESubmodules.router): the z-loss is the mean over the real tokens of the whole "
    "sequence, each rank's sum divided by the TP x CP group's real-token count, not a mean of per-rank means "
    "(which differs under sequence parallelism when a micro-batch has padding)",
)
"""Where the engine replaces megatron-core behaviour that is wrong for its rule (every parallel layout gives one
rank's losses) on every device, one line per site, each covered by tests/unit/model/test_router.py. Unlike the
CPU adaptor (engine/platform.py), nothing is patched: each is a subclass the layer spec builds."""


def megatron_core_version() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def transformer_engine_status() -> tuple[bool, str]:
    """(usable, why): TE's PyTorch extension imports and megatron-core loaded its TE spec classes.

    Megatron's own test is importing transformer_engine(.pytorch); the top-level package alone is not
    enough (it imports without the PyTorch extension, e.g. a JAX-only or broken install).
    """
    try:
        importlib.import_module("transformer_engine.pytorch")
    except (ImportError, OSError, RuntimeError) as err:  # OSError/RuntimeError: its CUDA libraries fail to load
        return False, f"transformer_engine.pytorch does not import ({type(err).__name__}: {err})"
    from megatron.core.models.gpt import gpt_layer_specs

    if not getattr(gpt_layer_specs, "HAVE_TE", False):
        return False, ("transformer_engine.pytorch imports, but megatron-core could not load its TE layers "
                       "(megatron.core.extensions.transformer_engine); check the TE and megatron-core versions")
    return True, "transformer_engine.pytorch imports and megatron-core loaded its TE layers"


def transformer_engine_available() -> bool:
    """Whether the TE layer spec can be built here (tests monkeypatch this one function)."""
    return transformer_engine_status()[0]


def te_decoder_block_spec(config: Any, vp_stage: int | None) -> Any:
    """megatron-core's TE decoder block of one (virtual) pipeline stage; q/k norms follow config.qk_layernorm."""
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_transformer_engine=True, normalization=config.normalization, vp_stage=vp_stage,
    )


def rope_fusion_available() -> bool:
    """megatron's own condition for apply_rope_fusion (TransformerConfig.__post_init__ raises otherwise)."""
    from megatron.core.models.common.embeddings import rope_utils

    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


def grad_accum_fusion_available() -> bool:
    """megatron's own condition for gradient_accumulation_fusion (its ColumnParallelLinear raises otherwise)."""
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def api_problems() -> list[str]:
    """What the installed megatron-core lacks of the API this engine calls (empty when all is there)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import TransformerConfig

    problems = []
    version = megatron_core_version()
    low, high = SUPPORTED_MEGATRON_CORE
    if not low <= version <= high:
        problems.append(f"megatron-core {version[0]}.{version[1]} is outside the versions read for the engine "
                        f"({low[0]}.{low[1]}-{high[0]}.{high[1]})")
    parameters = inspect.signature(gpt_layer_specs.get_gpt_decoder_block_spec).parameters
    missing = [name for name in TE_BLOCK_SPEC_PARAMETERS if name not in parameters]
    if missing:
        problems.append(f"get_gpt_decoder_block_spec has no parameter {', '.join(missing)}")
    fields = set(getattr(TransformerConfig, "__dataclass_fields__", {}))
    absent = [name for name in FUSION_FIELDS if name not in fields]
    if absent:
        problems.append(f"TransformerConfig has no field {', '.join(absent)}")
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter

    if "router" not in getattr(MoESubmodules, "__dataclass_fields__", {}):
        problems.append("MoESubmodules has no router field: MoE layers cannot build the engine's router "
                        "(engine.model.router)")
    z_loss = getattr(TopKRouter, "apply_z_loss", None)
    if z_loss is None or "padding_mask" not in inspect.signature(z_loss).parameters:
        problems.append("TopKRouter.apply_z_loss(logits, padding_mask) is missing: the engine's router overrides it")
    return problems


def describe() -> dict[str, Any]:
    """What this machine offers the model layer (printed by scripts/gpu_check.sh)."""
    import megatron.core

    te_ok, te_why = transformer_engine_status()
    return {
        "megatron_core": megatron.core.__version__,
        "transformer_engine": te_ok,
        "transformer_engine_detail": te_why,
        "rope_fusion": rope_fusion_available(),
        "grad_accum_fusion": grad_accum_fusion_available(),
        "api_problems": api_problems(),
    }
