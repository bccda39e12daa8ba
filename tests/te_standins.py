"""CPU stand-ins for transformer-engine's layers, so megatron-core's real TE spec can be built and run on CPU.

megatron-core's TE spec (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec) names its TE classes
through `TESpecProvider` and `TENorm`, which exist only when TE imports. `install()` (inside a test process)
puts stand-ins under those names and makes engine.model.compat report TE as available, so the engine's
own TE path runs: compat.te_decoder_block_spec -> megatron's spec functions -> GPTModel.

The stand-ins carry TE's parameter names (read from transformer_engine/pytorch/module/layernorm_linear.py:
`weight`, `bias`, `layer_norm_weight`, and `layer_norm_bias` unless RMSNorm) and compute what the local spec
computes (this project's Norm math, megatron's local TP linears, SDPA attention). What this proves: the spec
call, the module tree and the state-dict names of a TE model. What it cannot: TE's kernels, fp8, TE's
attention backends and its numerics (tests/cuda/ compares the real TE spec with the local one on a GPU).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from engine.model.attention import SDPAttention
from engine.model.norm import Norm


class TELayerNormColumnParallelLinearStandIn(ColumnParallelLinear):
    """TE's LayerNormLinear: the norm before the linear, its parameters named layer_norm_weight / _bias."""

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        kwargs.pop("skip_weight_param_allocation", None)
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_bias = (None if self.rms else
                                torch.nn.Parameter(torch.zeros(input_size, dtype=config.params_dtype)))

    def forward(self, input_, weight=None, runtime_gather_output=None):
        dtype = input_.dtype
        x = input_.float()
        if self.rms:
            x = self.layer_norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        else:
            x = self.layer_norm_weight * torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps).to(dtype)
            x = x + self.layer_norm_bias
        return super().forward(x)


class TESpecProviderStandIn:
    """megatron.core.extensions.transformer_engine_spec_provider.TESpecProvider's interface, stand-in classes."""

    def linear(self):
        return ColumnParallelLinear

    def column_parallel_linear(self):
        return ColumnParallelLinear

    def row_parallel_linear(self):
        return RowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        return TELayerNormColumnParallelLinearStandIn

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return Norm

    def core_attention(self):
        return SDPAttention

    def activation_func(self):
        return None


def install() -> None:
    """Make this process build megatron's TE spec with the stand-ins (call it in a spawned rank, not pytest's)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from engine.model import compat

    gpt_layer_specs.TESpecProvider = TESpecProviderStandIn
    gpt_layer_specs.TENorm = Norm
    compat.transformer_engine_available = lambda: True
