"""Model building blocks against their references: HF RMSNorm, megatron's unfused attention, HF llama3 RoPE."""

from __future__ import annotations

import types

import pytest
import torch

from tests.distributed.harness import run_ranks


def test_norm_matches_hf_rmsnorm_in_fp32_and_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from engine.model.norm import Norm

    for dtype in (torch.float32, torch.bfloat16):
        cfg = types.SimpleNamespace(normalization="RMSNorm", params_dtype=dtype, sequence_parallel=True)
        ours, hf = Norm(cfg, 16, eps=1e-6), LlamaRMSNorm(16, eps=1e-6).to(dtype)
        with torch.no_grad():
            weight = torch.randn(16).to(dtype)
            ours.weight.copy_(weight)
            hf.weight.copy_(weight)
        x = torch.randn(3, 5, 16).to(dtype)
        assert torch.equal(ours(x), hf(x))
        assert ours.weight.sequence_parallel  # so finalize_model_grads all-reduces it under SP


def _attention_outputs():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from engine.arguments import ParallelConfig
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.attention import SDPAttention

    initialize_distributed(ParallelConfig())
    set_random_seeds(0)  # megatron's attention forks the model-parallel RNG stream
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 2, 4, 8, generator=g)
    k, v = torch.randn(7, 2, 2, 8, generator=g), torch.randn(7, 2, 2, 8, generator=g)
    sdpa = SDPAttention(**args)(q, k, v, None)
    unfused = DotProductAttention(**args)(q, k, v, None)
    # An explicit padding-style mask (True = masked) must match too.
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1).expand(2, 1, 7, 7).clone()
    mask[1, ..., 5:] = True
    masked = (SDPAttention(**args)(q, k, v, mask), DotProductAttention(**args)(q, k, v, mask))
    return sdpa, unfused, masked


def test_sdpa_attention_equals_megatron_unfused_attention_with_gqa():
    sdpa, unfused, (sdpa_masked, unfused_masked) = run_ranks(_attention_outputs, 1)[0]
    assert sdpa.shape == (7, 2, 32)
    assert (sdpa - unfused).abs().max() < 1e-5
    assert (sdpa_masked - unfused_masked).abs().max() < 1e-5
    assert (sdpa_masked - sdpa).abs().max() > 1e-3  # the mask mattered


def _llama3_inv_freq(argv):
    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed
    from engine.model.provider import build_frozen_model, unwrap_model

    config = parse_args(argv, world_size=1)
    platform = initialize_distributed(config.parallel)
    return unwrap_model(build_frozen_model(config, platform)[0]).rotary_pos_emb.inv_freq


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    argv = ("--num-layers 1 --hidden-size 64 --num-attention-heads 2 --seq-length 16 --vocab-size 32 "
            "--rotary-base 500000 --rope-scaling-type llama3 --rope-scaling-factor 32 --low-freq-factor 2 "
            "--high-freq-factor 8 --original-max-position-embeddings 64").split()
    ours = run_ranks(_llama3_inv_freq, 1, argv)[0]
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000, max_position_embeddings=512,
                            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0,
                                          "high_freq_factor": 8.0, "original_max_position_embeddings": 64})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    assert torch.allclose(ours, hf_inv_freq.float(), rtol=1e-6)


def _packed_and_separate_logits(argv):
    from megatron.core.packed_seq_params import PackedSeqParams

    from engine.arguments import parse_args
    from engine.initialize import initialize_distributed
    from engine.model.attention import HostPackedSeqParams
    from engine.model.provider import build_frozen_model

    config = parse_args(argv, world_size=1)
    model = build_frozen_model(config, initialize_distributed(config.parallel))[0]
    g = torch.Generator().manual_seed(0)
    lengths = [5, 11, 1, 8, 7]  # the last one stands for a padding tail
    sequences = [torch.randint(0, 32, (1, n), generator=g) for n in lengths]
    separate = [model(s, torch.arange(s.shape[1])[None], None) for s in sequences]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    row = torch.cat(sequences, dim=1)
    host = HostPackedSeqParams(**vars(packed), seq_lengths=tuple(lengths))
    with_host_lengths = model(row, positions, None, packed_seq_params=host)
    return (torch.cat(separate, dim=1), model(row, positions, None, packed_seq_params=packed), model(row, positions, None),
            with_host_lengths)


def test_thd_packed_row_gives_each_sequence_the_logits_it_has_alone():
    """Rope restarts per sequence and attention stays inside it (SDPAttention's THD path)."""
    argv = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
            "--seq-length 16 --vocab-size 32 --position-embedding-type rope --normalization RMSNorm "
            "--swiglu --disable-bias-linear").split()
    separate, packed, unpacked, with_host_lengths = run_ranks(_packed_and_separate_logits, 1, argv)[0]
    assert packed.shape[:2] == separate.shape[:2] == (1, 32)
    assert (packed - separate).abs().max() < 1e-5
    assert torch.equal(with_host_lengths, packed)  # the lengths the collate carries split the row the same way
    assert (unpacked - separate)[:, 5:].abs().amax(dim=-1).min() > 1e-4  # one causal row would mix sequences


def test_grouped_gemm_on_the_local_spec_is_refused_with_the_way_out():
    from engine.model.spec import decoder_block_spec

    config = types.SimpleNamespace(moe_grouped_gemm=True, num_moe_experts=4)
    with pytest.raises(ValueError, match="--moe-grouped-gemm runs the experts through transformer-engine"):
        decoder_block_spec(config, "local", "sdpa", None)
