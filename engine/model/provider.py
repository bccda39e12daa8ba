"""Builds megatron-core GPTModel chunks for this rank, and wraps them for training.

One function maps the engine's config onto megatron's TransformerConfig (the
`core_transformer_config_from_args` of this project); one builds the model chunks of
this pipeline rank (several under the interleaved schedule); one wraps them in
mixed precision and DDP. The frozen reference policy uses the same builder
without the DDP wrap, so both run identical forward code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.router import TopKRouter

from engine.arguments import EngineConfig
from engine.model import compat
from engine.model.gpt import PreferenceGPTModel
from engine.model.lora import LoraSettings, prepare_adapters
from engine.model.spec import decoder_block_spec, resolve_transformer_impl
from engine.model.value_head import RewardGPTModel
from engine.platform import Platform, current_device


def _pipeline_layout(num_layer_list: tuple[int, ...] | None) -> list[list[str]] | None:
    """--num-layer-list as megatron's per-stage layout: embedding first, decoders, loss last."""
    if num_layer_list is None:
        return None
    stages = [["decoder"] * n for n in num_layer_list]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return stages


def fusions(config: EngineConfig, platform: Platform, transformer_impl: str) -> dict[str, bool]:
    """megatron's kernel fusions: on CUDA where their kernels exist, off on CPU (the unfused paths are exact).

    - bias-SwiGLU (bias_activation_fusion) and bias-dropout-add: megatron's jit-fused functions, CUDA only
      here; megatron refuses the activation fusion for a bias-free plain GeLU MLP.
    - RoPE fusion: TE's fused rotary kernel, used by megatron's attention whatever the spec (compat).
    - gradient-accumulation fusion: wgrad GEMMs accumulate into main_grad; with the TE spec only (LoRA's
      frozen local linears stay unfused) and only where apex's extension exists, since megatron's own
      output layer needs it (compat).
    - masked-softmax and persistent-layer-norm fusion stay off: the local spec's SDPA attention and norm
      do not use them, and TE has its own.
    """
    if not platform.is_cuda:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                    persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False)
    m = config.model
    return dict(
        bias_activation_fusion=m.swiglu or not m.disable_bias_linear,
        bias_dropout_fusion=True,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # --shared-prompt rotates each token by its position id, through megatron's unfused RoPE (engine/model/gpt.py).
        apply_rope_fusion=(m.position_embedding_type == "rope" and compat.rope_fusion_available()
                           and not config.data.shared_prompt),
        gradient_accumulation_fusion=transformer_impl == "transformer_engine" and compat.grad_accum_fusion_available(),
    )


def fixed_seq_length(config: EngineConfig) -> bool:
    """Whether every micro-batch is padded to --seq-length: megatron-core's allgather MoE dispatcher gathers
    the same number of tokens from every rank of its group, and refuses variable_seq_lengths."""
    return config.moe.enabled and config.moe.moe_token_dispatcher_type == "allgather"


def moe_fields(config: EngineConfig) -> dict:
    """The MoE part of TransformerConfig (all defaults for a dense model)."""
    moe, par, pairs = config.moe, config.parallel, config.training.micro_batch_size
    if not moe.enabled:
        # megatron rejects variable_seq_lengths with its default (allgather) dispatcher, even without experts.
        return dict(moe_token_dispatcher_type="alltoall")
    pattern = moe.layer_pattern(config.model.num_layers)
    return dict(
        num_moe_experts=moe.num_experts,
        # megatron-core's field (its TE decoder spec builds the layers from it), as the pattern itself.
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_ffn_hidden_size=moe.expert_ffn(config.model),
        moe_router_topk=moe.moe_router_topk,
        moe_router_pre_softmax=moe.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=moe.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        # Scaled by the pairs of a micro-batch: see `count_router_losses_per_micro_batch`.
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff * pairs,
        # 0 is off, as for the aux loss: megatron's router would log z-loss / 0 (NaN) for a zero coefficient.
        moe_z_loss_coeff=moe.moe_z_loss_coeff * pairs if moe.moe_z_loss_coeff else None,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=moe.moe_shared_expert_gate,
        moe_shared_expert_overlap=moe.moe_shared_expert_overlap,
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        moe_grouped_gemm=moe.moe_grouped_gemm,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_size,
    )


def transformer_config(config: EngineConfig, platform: Platform, transformer_impl: str = "local") -> TransformerConfig:
    m, par, prec = config.model, config.parallel, config.precision
    on_gpu = platform.is_cuda
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        qk_layernorm=m.qk_layernorm,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_size,
        pipeline_model_parallel_layout=_pipeline_layout(par.num_layer_list),
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        params_dtype=prec.params_dtype,
        pipeline_dtype=prec.params_dtype,
        bf16=prec.bf16,
        fp16=prec.fp16,
        attention_softmax_in_fp32=prec.attention_softmax_in_fp32,
        **fusions(config, platform, transformer_impl),
        # The loss function returns (sum, count); megatron then normalizes gradients by the
        # global count over micro-batches and DP ranks, so a global batch's loss does not
        # depend on how it is split.
        calculate_per_token_loss=True,
        # DPO micro-batches are padded to their own longest pair, so stage-to-stage activation shapes vary and
        # must be communicated; under the allgather MoE dispatcher every micro-batch has --seq-length tokens.
        variable_seq_lengths=not fixed_seq_length(config),
        **moe_fields(config),
        # With two pipeline ranks, a batched p2p call holds an activation and a gradient for the same
        # peer, and the backend matches same-peer messages in posting order, which differs between
        # the two ranks: activations and gradients swap silently. Unbatched p2p orders the calls by
        # rank parity and sends the two directions through different groups.
        batch_p2p_comm=not (par.pipeline_model_parallel_size == 2 and config.virtual_pipeline_size),
        # --deterministic-mode: megatron's own deterministic paths (the embedding's backward without atomics).
        deterministic_mode=config.training.deterministic_mode,
        # CPU init draws the full weight from one generator, then splits it: the same seed
        # gives the same model for any TP size. On GPU, per-rank init is much faster.
        use_cpu_initialization=not on_gpu,
    )


def count_router_losses_per_micro_batch(model: GPTModel) -> None:
    """The router's losses enter the policy loss as coeff x (their mean over the global batch's micro-batches).

    Under calculate_per_token_loss megatron-core multiplies each router loss by the micro-batch's token
    count, expecting loss_func's count to be tokens; the DPO count is pairs, and megatron divides every
    gradient by the global pair count N. So the routers take their losses unmultiplied, and the
    coefficients are scaled by the pairs of a micro-batch (`moe_fields`): over M = N / micro-batch-size
    micro-batches, sum(coeff x mbs x loss) / N = coeff x mean(loss), whatever the TP/PP/DP/EP layout.
    Only a forward with gradients in training mode adds them (megatron's router skips them otherwise), so
    reference passes (no_grad, eval) and evaluation never do.
    """
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.calculate_per_token_loss = False


def _apply_llama3_rope_scaling(model: GPTModel, config: EngineConfig) -> None:
    """megatron-core fixes low/high frequency factors and the original context; Llama 3.x sets them."""
    m = config.model
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq,
        factor=m.rope_scaling_factor,
        low_freq_factor=m.low_freq_factor,
        high_freq_factor=m.high_freq_factor,
        original_max_position_embeddings=m.original_max_position_embeddings,
    )


def build_model_chunks(config: EngineConfig, platform: Platform) -> list[GPTModel]:
    """This pipeline rank's GPTModel chunks (one per virtual stage), on the device, in params dtype: their output
    layer runs on the positions the forward names (`PreferenceGPTModel`); under a value-head stage (rm)
    `RewardGPTModel` chunks, whose head runs on every position."""
    lora = config.lora
    adapters = LoraSettings(lora.lora_r, lora.lora_alpha, lora.lora_dropout) if lora.enabled else None
    impl = resolve_transformer_impl(config.model.transformer_impl, lora=lora.enabled,
                                    shared_prompt=config.data.shared_prompt)
    tf_config = transformer_config(config, platform, impl)
    vpp = config.virtual_pipeline_size
    # A reward model (--stage rm) ends in a scalar value head instead of the tied or untied vocab projection.
    if config.preference.traits.value_head:
        build, extra = RewardGPTModel, {"head_seed": config.training.seed}
    else:
        tied = not config.model.untie_embeddings_and_output_weights
        build, extra = PreferenceGPTModel, {"share_embeddings_and_output_weights": tied}
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = build(
            config=tf_config,
            transformer_layer_spec=decoder_block_spec(tf_config, impl, config.model.attention_backend, vp_stage,
                                                      adapters, tuple(lora.lora_target_modules)),
            vocab_size=config.padded_vocab_size,
            max_sequence_length=config.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            position_embedding_type=config.model.position_embedding_type,
            rotary_base=config.model.rotary_base,
            vp_stage=vp_stage,
            **extra,
        )
        if config.model.rope_scaling_type == "llama3":
            _apply_llama3_rope_scaling(model, config)
        count_router_losses_per_micro_batch(model)
        chunks.append(model.to(current_device()))
    return chunks


def wrap_mixed_precision(chunks: list[GPTModel], config: EngineConfig) -> list[torch.nn.Module]:
    """bf16/fp16 params behind megatron's Float16Module (fp32 logits out, fp32 main params in the optimizer)."""
    if not (config.precision.bf16 or config.precision.fp16):
        return list(chunks)
    return [Float16Module(chunk.config, chunk) for chunk in chunks]


def wrap_ddp(chunks: list[torch.nn.Module], config: EngineConfig) -> list[DistributedDataParallel]:
    """megatron DDP: contiguous grad buffers, DP reduce (reduce-scatter under the distributed optimizer)."""
    par = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.precision.bf16 or config.precision.fp16,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=config.training.check_for_nan_in_loss_and_grad,
    )
    return [
        DistributedDataParallel(
            config=chunk.config if hasattr(chunk, "config") else chunk.module.config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buffer overlaps with backward; later ones are reduced at the end.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]


def build_trainable_model(config: EngineConfig, platform: Platform) -> list[DistributedDataParallel]:
    chunks = build_model_chunks(config, platform)
    if config.lora.enabled:
        prepare_adapters(chunks, config.training.seed)  # before DDP: only adapters get grad buffers
    return wrap_ddp(wrap_mixed_precision(chunks, config), config)


def build_frozen_model(config: EngineConfig, platform: Platform) -> list[torch.nn.Module]:
    """Same structure as the policy, no grads, eval mode (the reference policy)."""
    chunks = wrap_mixed_precision(build_model_chunks(config, platform), config)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks


def unwrap_model(chunk: torch.nn.Module) -> GPTModel:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, GPTModel):
        chunk = chunk.module
    return chunk
