"""The engine's flags: typed config sections, each option declared once (engine/options.py).

Users carry launch scripts over from Megatron-LM and MindSpeed-LLM, so flag names follow
theirs. The parser is generated from the declarations; below the entry point nothing reads
argparse output. Each section checks its own rules and names the flag in its errors;
`validate()` checks the rules that span sections (batch sizes against the layout), and
`check_inputs()` what a training start needs on disk, so `--validate-only` fails exactly
where a real start would. Torch-free: the lowest layer of the package graph.
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

from engine.formats import OUTPUT_KEYS, UNPAIRED_KEYS, missing_shards_message
from engine.loss_catalog import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    LOSS_TRAITS,
    SORTED_LOSS_TYPES,
    STAGE_OPTIONS,
    STAGE_TRAITS,
    STAGES,
    StageTraits,
    option_note,
    stage_summary,
)
from engine.options import ConfigError, Section, add_options, option, require, section_from_args


@dataclass
class ModelConfig(Section):
    """Decoder architecture (Llama / Mistral / Qwen2 / Qwen3 family)."""

    num_layers: int = option(help="transformer layers")
    hidden_size: int = option(help="width of the residual stream")
    num_attention_heads: int = option(help="query heads")
    seq_length: int = option(help="longest training sequence (tokens)")
    ffn_hidden_size: int | None = option(None, "MLP width; default 4 x --hidden-size")
    group_query_attention: bool = option(False, "use --num-query-groups key/value heads")
    num_query_groups: int | None = option(None, "key/value heads under --group-query-attention")
    kv_channels: int | None = option(None, "head dim; default --hidden-size / --num-attention-heads (Qwen3 sets it)")
    max_position_embeddings: int | None = option(None, "longest position; default --seq-length")
    position_embedding_type: str = option("rope", "rotary or learned positions", choices=("rope", "learned_absolute"))
    rotary_base: int = option(10000, "RoPE theta")
    rope_scaling_type: str | None = option(None, "Llama 3.1 RoPE frequency scaling", choices=("llama3",),
                                           aliases={"--use-rope-scaling": "llama3"})
    rope_scaling_factor: float = option(8.0, "llama3 rope scaling: the frequency scaling factor")
    low_freq_factor: float = option(1.0, "llama3 rope scaling: low-frequency wavelength factor")
    high_freq_factor: float = option(4.0, "llama3 rope scaling: high-frequency wavelength factor")
    original_max_position_embeddings: int = option(8192, "llama3 rope scaling: the pre-scaling context")
    normalization: str = option("RMSNorm", "norm layer", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-5, "epsilon of every norm")
    swiglu: bool = option(False, "gated SiLU MLP (gate and up fused in linear_fc1)")
    disable_bias_linear: bool = option(False, "no biases in linear layers")
    add_qkv_bias: bool = option(False, "bias on linear_qkv only (Qwen2)")
    qk_layernorm: bool = option(False, "per-head RMSNorm on queries and keys (Qwen3)")
    untie_embeddings_and_output_weights: bool = option(False, "an output layer of its own instead of the embedding")
    vocab_size: int | None = option(None, "tokenizer vocabulary size (before padding); read from the tokenizer flags if absent")
    make_vocab_size_divisible_by: int = option(128, "padded vocab is a multiple of this x TP")
    padded_vocab_size: int | None = option(None, "explicit padded size (overrides the rounding rule)")
    init_method_std: float = option(0.02, "std of the random init (weights not in the checkpoint, e.g. LoRA B stays 0)")
    hidden_dropout: float = option(0.0, "dropout after attention and MLP")
    attention_dropout: float = option(0.0, "dropout on attention probabilities")
    transformer_impl: str = option("auto", "layer implementation: auto is transformer_engine when importable",
                                   choices=("auto", "transformer_engine", "local"))
    attention_backend: str = option("auto", "local spec attention: sdpa (torch scaled_dot_product_attention), "
                                    "unfused (megatron's DotProductAttention), auto (sdpa)",
                                    choices=("auto", "sdpa", "unfused"))

    def check(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if not self.group_query_attention:
            require(
                self.num_query_groups in (None, self.num_attention_heads),
                "--num-query-groups needs --group-query-attention",
            )
            self.num_query_groups = self.num_attention_heads
        require(
            self.num_query_groups is not None,
            "--group-query-attention needs --num-query-groups",
        )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "num_query_groups"):
            require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({self.num_query_groups})",
        )
        if self.kv_channels is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}), or set --kv-channels",
            )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        require(
            self.seq_length <= self.max_position_embeddings,
            f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
            f"({self.max_position_embeddings})",
        )
        require(
            self.vocab_size is not None or self.padded_vocab_size is not None,
            "the model needs --vocab-size (tokenizer size), --padded-vocab-size, or tokenizer flags to read it from",
        )

    def padded_vocab(self, tensor_model_parallel_size: int) -> int:
        """Vocab rows of the embedding: the tokenizer size rounded up so every TP shard is equal."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


MOE_PATTERN_MAX_LAYERS = 100_000
"""Longest --moe-layer-freq pattern the parser builds (a bound on `[1]*N`, far above any real model)."""


def _pattern_value(node: ast.AST) -> int | list[int]:
    """One node of a --moe-layer-freq pattern: integer literals, lists of them, `+` and `*`; nothing else runs."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.List):
        items = [_pattern_value(item) for item in node.elts]
        if not all(isinstance(item, int) for item in items):
            raise ValueError("list entries must be integers")
        return items
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _pattern_value(node.left), _pattern_value(node.right)
        if isinstance(node.op, ast.Add):
            if isinstance(left, list) != isinstance(right, list):
                raise ValueError("'+' joins two lists or adds two integers")
            return left + right
        if isinstance(left, int) and isinstance(right, int):
            return left * right
        items, count = (left, right) if isinstance(left, list) else (right, left)
        if not isinstance(count, int) or len(items) * max(count, 0) > MOE_PATTERN_MAX_LAYERS:
            raise ValueError(f"'*' repeats a list an integer number of times, up to {MOE_PATTERN_MAX_LAYERS} entries")
        return items * count
    what = type(node.op if isinstance(node, ast.BinOp) else node).__name__
    raise ValueError(f"{what} is not allowed: use integers, [...], + and *")


def parse_moe_layer_freq(text: str) -> int | list[int]:
    """argparse type of --moe-layer-freq, Megatron-LM's semantics: an integer N (every Nth layer, counting from the
    first, is an MoE layer), or a Python list expression with one 0 (dense) or 1 (MoE) per layer such as
    "[0]*1+[1]*3" or "([1]*3+[0]*1)*2". Megatron-LM evaluates the expression with eval(); here only integer
    literals, lists, + and * are read (ast), so a flag cannot run code."""
    text = text.strip()
    if "[" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer N or a list pattern such as [0]*1+[1]*3, got "
                                             f"{text!r}") from None
    try:
        value = _pattern_value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer pattern such as [0]*1+[1]*3: {err}") from None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} gives an integer, not a list of 0/1 per layer")
    return value


def moe_layer_pattern(freq: int | Sequence[int], num_layers: int) -> list[int]:
    """One entry per layer, 1 an MoE layer and 0 a dense one (megatron-core's get_gpt_decoder_layer_specs)."""
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return list(freq)


def moe_layer_freq_text(pattern: Sequence[int]) -> str:
    """A pattern as the --moe-layer-freq text that rebuilds it: its shortest repeating block times the repeats,
    e.g. [0,1]*24 (no spaces, one shell word; Megatron-LM reads it too)."""
    n = len(pattern)
    period = next(p for p in range(1, n + 1) if n % p == 0 and list(pattern[:p]) * (n // p) == list(pattern))
    block = "[" + ",".join(map(str, pattern[:period])) + "]"
    return block if period == n else f"{block}*{n // period}"


MOE_DISPATCHERS = ("alltoall", "allgather")
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")


@dataclass
class MoEConfig(Section):
    """Mixture of experts (Megatron-LM flag names); a dense model unless --num-experts is set."""

    num_experts: int | None = option(None, "routed experts of every MoE layer (by default every decoder layer's "
                                           "MLP; see --moe-layer-freq)")
    moe_layer_freq: int | list[int] = option(
        1, "which layers are MoE layers, the others dense MLPs of --ffn-hidden-size: an integer N (layers 0, N, 2N, "
           "... are MoE; 1 all of them) or a list pattern with a 0 (dense) or 1 (MoE) per layer, e.g. "
           "\"[0]*1+[1]*3\" or \"([1]*3+[0]*1)*2\" (Megatron-LM's flag; integer literals, lists, + and * only)",
        type=parse_moe_layer_freq, metavar="N|PATTERN")
    moe_ffn_hidden_size: int | None = option(None, "width of each routed expert; default --ffn-hidden-size")
    moe_router_topk: int = option(2, "experts each token is routed to")
    moe_router_pre_softmax: bool = option(False, "softmax over all experts, then take the top k (probabilities "
                                                 "not renormalized: Qwen2-MoE); default top k of the logits, then "
                                                 "softmax over them (normalized top k: Mixtral, Qwen3-MoE)")
    moe_router_topk_scaling_factor: float | None = option(None, "scale the routing probabilities (with "
                                                                "--moe-router-pre-softmax)")
    moe_router_load_balancing_type: str = option("aux_loss", "the router's load-balancing loss: aux_loss (over "
                                                             "the micro-batch, Switch/GShard), seq_aux_loss (per "
                                                             "sequence), none", choices=MOE_LOAD_BALANCING)
    moe_aux_loss_coeff: float = option(0.0, "weight of the load-balancing loss in the policy loss (0: off)")
    moe_z_loss_coeff: float | None = option(None, "weight of the router z-loss in the policy loss (ST-MoE)")
    moe_shared_expert_intermediate_size: int | None = option(None, "width of the shared expert every token also "
                                                                   "goes through (Qwen2-MoE); default none")
    moe_shared_expert_gate: bool = option(False, "scale the shared expert's output by sigmoid(a learned gate) "
                                                 "(Qwen2-MoE)")
    moe_shared_expert_overlap: bool = option(False, "run the shared expert concurrently with the token dispatch "
                                                    "(needs --moe-token-dispatcher-type alltoall)")
    moe_token_dispatcher_type: str = option(
        "alltoall", "how tokens reach their experts' ranks: alltoall (variable-length micro-batches; the default "
                    "here, unlike Megatron-LM's allgather) or allgather (every micro-batch padded to --seq-length, "
                    "since megatron-core's allgather dispatcher needs one shape on all ranks)",
        choices=MOE_DISPATCHERS)
    moe_grouped_gemm: bool = option(False, "run a rank's experts as one grouped GEMM (CUDA only: "
                                           "transformer-engine's or the grouped_gemm package's kernels)")

    def check(self) -> None:
        if self.num_experts is None:
            defaults = {f.name: f.default for f in fields(self)}
            given = sorted(name for name in defaults if name != "num_experts" and getattr(self, name) != defaults[name])
            require(not given, f"{', '.join('--' + n.replace('_', '-') for n in given)} need(s) --num-experts")
            return
        require(self.num_experts >= 1, "--num-experts must be >= 1")
        freq = self.moe_layer_freq
        require(freq >= 1 if isinstance(freq, int) else set(freq) <= {0, 1},
                f"--moe-layer-freq {freq}: an integer >= 1, or a list of 0 (dense) and 1 (MoE) entries")
        require(1 <= self.moe_router_topk <= self.num_experts,
                f"--moe-router-topk ({self.moe_router_topk}) must be between 1 and --num-experts ({self.num_experts})")
        # megatron-core's rule: a softmax over one selected logit is constant, so its router would get no gradient.
        require(self.moe_router_topk > 1 or self.moe_router_pre_softmax,
                "--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over one expert has no gradient)")
        require(self.moe_router_topk_scaling_factor is None or self.moe_router_topk_scaling_factor > 0,
                "--moe-router-topk-scaling-factor must be > 0")
        require(self.moe_aux_loss_coeff >= 0, "--moe-aux-loss-coeff must be >= 0")
        require(self.moe_z_loss_coeff is None or self.moe_z_loss_coeff >= 0, "--moe-z-loss-coeff must be >= 0")
        require(self.moe_aux_loss_coeff == 0 or self.moe_router_load_balancing_type != "none",
                "--moe-aux-loss-coeff needs a --moe-router-load-balancing-type other than none")
        require(self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size > 0, "--moe-ffn-hidden-size must be > 0")
        shared = self.moe_shared_expert_intermediate_size
        require(shared is None or shared > 0, "--moe-shared-expert-intermediate-size must be > 0")
        require(not self.moe_shared_expert_gate or shared is not None,
                "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        require(not self.moe_shared_expert_overlap or shared is not None,
                "--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size")
        require(not self.moe_shared_expert_overlap or self.moe_token_dispatcher_type == "alltoall",
                "--moe-shared-expert-overlap needs --moe-token-dispatcher-type alltoall")

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

    def expert_ffn(self, model: ModelConfig) -> int:
        """Width of each routed expert (--moe-ffn-hidden-size, else --ffn-hidden-size)."""
        return self.moe_ffn_hidden_size or model.ffn_hidden_size

    def layer_pattern(self, num_layers: int) -> list[int]:
        """1 for each MoE layer, 0 for each dense one (all 0 without --num-experts); `check_expert_layout` has
        checked a list pattern's length against --num-layers."""
        if not self.enabled:
            return [0] * num_layers
        return moe_layer_pattern(self.moe_layer_freq, num_layers)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for comma-separated counts such as --num-layer-list 3,5 (training and convert_ckpt.py)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5, got {text!r}") from None


@dataclass
class ParallelConfig(Section):
    """Tensor, pipeline and data parallel layout."""

    tensor_model_parallel_size: int = option(1, "tensor-parallel ranks (TP)")
    pipeline_model_parallel_size: int = option(1, "pipeline stages (PP)")
    num_layers_per_virtual_pipeline_stage: int | None = option(None, "layers per model chunk: the interleaved 1F1B "
                                                                     "schedule")
    num_layer_list: tuple[int, ...] | None = option(
        None, "decoder layers of each pipeline stage, e.g. 3,5 (uneven PP, as in MindSpeed-LLM); default an even "
              "split. Must match the checkpoint's split (convert_ckpt.py --num-layer-list)",
        type=int_list, metavar="N1,N2,...")
    sequence_parallel: bool = option(False, "shard norm and dropout activations over TP (needs TP > 1)")
    expert_model_parallel_size: int = option(1, "expert-parallel ranks (EP): the experts of each MoE layer are "
                                                "split over them (--num-experts must be divisible by EP)")
    expert_tensor_parallel_size: int | None = option(None, "tensor-parallel ranks inside each expert (ETP), a "
                                                           "divisor of TP (1: whole experts); default "
                                                           "--tensor-model-parallel-size")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over DP (ZeRO-1)")
    overlap_grad_reduce: bool = option(False, "overlap the DP gradient reduction with backward")
    overlap_param_gather: bool = option(False, "overlap the parameter all-gather with forward (needs "
                                               "--use-distributed-optimizer)")
    distributed_backend: str | None = option(None, "default nccl on CUDA, gloo on CPU", choices=("nccl", "gloo"))
    distributed_timeout_minutes: int = option(10, "collective timeout")
    recompute_granularity: str | None = option(None, "activation recomputation: full (whole layers) or selective "
                                                     "(core attention)", choices=("full", "selective"))
    recompute_method: str | None = option(None, "--recompute-granularity full: uniform (every N layers as a group) "
                                                "or block (the first N per stage)", choices=("uniform", "block"))
    recompute_num_layers: int | None = option(None, "--recompute-granularity full: N for --recompute-method")

    def check(self) -> None:
        require(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        require(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        require(self.expert_model_parallel_size >= 1, "--expert-model-parallel-size must be >= 1")
        require(self.expert_tensor_parallel_size is None or self.expert_tensor_parallel_size >= 1,
                "--expert-tensor-parallel-size must be >= 1")
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1",
        )
        require(
            self.num_layers_per_virtual_pipeline_stage is None or self.pipeline_model_parallel_size > 1,
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
        )
        if self.num_layer_list is not None:
            layers = ",".join(map(str, self.num_layer_list))
            require(
                len(self.num_layer_list) == self.pipeline_model_parallel_size and min(self.num_layer_list) > 0,
                f"--num-layer-list {layers} needs one positive count per pipeline stage "
                f"(--pipeline-model-parallel-size {self.pipeline_model_parallel_size})",
            )
            require(
                self.num_layers_per_virtual_pipeline_stage is None,
                "--num-layer-list cannot be combined with --num-layers-per-virtual-pipeline-stage",
            )
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer",
        )
        if self.recompute_granularity == "full":
            require(
                self.recompute_method in ("uniform", "block") and (self.recompute_num_layers or 0) >= 1,
                "--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers >= 1",
            )
        else:
            require(
                self.recompute_method is None and self.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only",
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def expert_tensor_size(self) -> int:
        """ETP: --expert-tensor-parallel-size, else TP (megatron-core's default)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size


@dataclass
class PrecisionConfig(Section):
    """Parameter and compute precision."""

    bf16: bool = option(False, "bf16 params with fp32 main weights and grads")
    fp16: bool = option(False, "fp16 params with dynamic loss scaling")
    attention_softmax_in_fp32: bool = option(False, "softmax of attention scores in fp32 (unfused attention)")
    initial_loss_scale: float = option(2.0**32, "--fp16: the first dynamic loss scale")

    def check(self) -> None:
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")

    @property
    def params_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class TrainingConfig(Section):
    """Batch sizes, optimizer and learning-rate schedule."""

    micro_batch_size: int = option(1, "pairs (samples under --stage kto) per micro-batch per DP rank")
    global_batch_size: int | None = option(None, "pairs (samples under --stage kto) per optimizer step; "
                                                  "default --micro-batch-size x DP")
    max_tokens_per_micro_batch: int | None = option(
        None, "form micro-batches by a token budget instead of --micro-batch-size pairs: each DP rank's pairs of a "
              "global batch, in order, fill micro-batches while their collated tokens (chosen and rejected rows with "
              "their padding, or the packed row) stay within this; the global batch stays --global-batch-size pairs")
    train_iters: int | None = option(None, "optimizer steps of the run (required to train)")
    lr: float = option(1e-5, "peak learning rate")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    lr_decay_style: str = option("cosine", "decay after warm-up",
                                 choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_decay_iters: int | None = option(None, "steps of warm-up + decay; default --train-iters")
    lr_wsd_decay_iters: int | None = option(None, "--lr-decay-style WSD (warm-up, stable, decay): steps of the final "
                                                   "decay, the last ones of --lr-decay-iters; the lr stays at --lr "
                                                   "from the warm-up's end until then (required with WSD, as in "
                                                   "Megatron-LM)")
    lr_wsd_decay_style: str = option("exponential", "--lr-decay-style WSD: shape of the final decay",
                                     choices=("exponential", "linear", "cosine", "minus_sqrt"))
    lr_warmup_fraction: float | None = option(None, "warm-up as a fraction of --lr-decay-iters (exclusive with "
                                                    "--lr-warmup-iters)")
    lr_warmup_iters: int = option(0, "warm-up steps")
    lr_warmup_init: float = option(0.0, "learning rate at the start of warm-up")
    override_opt_param_scheduler: bool = option(
        False, "on resume, the schedule flags replace the checkpoint's schedule (its step count is kept)",
        aliases={"--override-opt_param-scheduler": True})
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "on resume, the checkpoint's schedule replaces the schedule flags; with neither flag, a resume whose "
               "schedule flags differ from the checkpoint's is refused",
        aliases={"--use-checkpoint-opt_param-scheduler": True})
    weight_decay: float = option(0.01, "AdamW weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    adam_eps: float = option(1e-8, "Adam epsilon")
    clip_grad: float = option(1.0, "global gradient-norm clip (0 disables)")
    seed: int = option(1234, "seed of data order, dropout and random init")
    deterministic_mode: bool = option(
        False, "bit-identical reruns and resumes on CUDA (Megatron-LM's flag): deterministic torch algorithms, "
               "NCCL_ALGO=Ring, CUBLAS_WORKSPACE_CONFIG=:4096:8, NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 and "
               "megatron's deterministic code paths; slower")
    eval_interval: int | None = option(None, "steps between evaluations on the valid split (default: never)")
    eval_iters: int = option(10, "global batches per evaluation")
    max_skipped_iters: int = option(10, "stop after this many consecutive updates skipped for a non-finite loss or "
                                        "gradient norm")
    check_for_nan_in_loss_and_grad: bool = option(False, "megatron's DDP raises on NaN gradients (instead of "
                                                         "skipping the update)")
    exit_signal_handler: bool = option(False, "on SIGTERM/SIGINT, save a checkpoint at the next iteration and exit 0")
    exit_interval: int | None = option(None, "save and exit when the iteration is a multiple of this")
    exit_duration_in_mins: float | None = option(None, "save and exit once the run has lasted this long")

    def check(self) -> None:
        require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        require(self.max_tokens_per_micro_batch is None or self.max_tokens_per_micro_batch >= 1,
                "--max-tokens-per-micro-batch must be >= 1")
        require(self.eval_interval is None or self.eval_interval >= 1, "--eval-interval must be >= 1")
        require(self.eval_iters >= 1, "--eval-iters must be >= 1")
        require(self.max_skipped_iters >= 1, "--max-skipped-iters must be >= 1")
        require(self.exit_interval is None or self.exit_interval >= 1, "--exit-interval must be >= 1")
        require(
            self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
            "--exit-duration-in-mins must be > 0",
        )
        require(self.train_iters is None or self.train_iters >= 1, "--train-iters must be >= 1")
        require(self.lr >= 0 and self.min_lr >= 0, "--lr and --min-lr must be >= 0")
        require(self.min_lr <= self.lr, f"--min-lr ({self.min_lr}) exceeds --lr ({self.lr})")
        require(
            self.lr_warmup_fraction is None or self.lr_warmup_iters == 0,
            "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive",
        )
        require(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually exclusive",
        )
        # megatron's scheduler asserts warm-up < decay steps: say it with the flags instead.
        require(
            self.lr_warmup_fraction is None or 0.0 <= self.lr_warmup_fraction < 1.0,
            "--lr-warmup-fraction must be in [0, 1): warm-up has to end before the decay does",
        )
        decay_iters = self.lr_decay_iters or self.train_iters
        require(self.lr_decay_iters is None or self.lr_decay_iters >= 1, "--lr-decay-iters must be >= 1")
        require(
            decay_iters is None or self.lr_warmup_iters < decay_iters,
            f"--lr-warmup-iters ({self.lr_warmup_iters}) must be below the decay steps ({decay_iters}, "
            f"{'--lr-decay-iters' if self.lr_decay_iters else '--train-iters'})",
        )
        require(self.lr_warmup_init <= self.lr, f"--lr-warmup-init ({self.lr_warmup_init}) exceeds --lr ({self.lr})")
        require((self.lr_decay_style == "WSD") == (self.lr_wsd_decay_iters is not None),
                "--lr-decay-style WSD needs --lr-wsd-decay-iters (the steps of its final decay)"
                if self.lr_decay_style == "WSD" else "--lr-wsd-decay-iters applies to --lr-decay-style WSD")
        if self.lr_wsd_decay_iters is not None and decay_iters is not None:
            after_warmup = decay_iters * (1 - (self.lr_warmup_fraction or 0)) - self.lr_warmup_iters
            require(1 <= self.lr_wsd_decay_iters <= after_warmup,
                    f"--lr-wsd-decay-iters ({self.lr_wsd_decay_iters}) must be between 1 and the {after_warmup:g} "
                    "decay steps after the warm-up")
        require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "--adam-beta1/2 must be in [0, 1)")
        require(self.clip_grad >= 0, "--clip-grad must be >= 0")


@dataclass
class CheckpointConfig(Section):
    """Where to load from and save to (Megatron-LM checkpoint layout)."""

    load: str | None = option(None, "checkpoint directory to start from (required to train)")
    save: str | None = option(None, "directory for new checkpoints")
    save_interval: int | None = option(None, "steps between checkpoints (and one at the end)")
    finetune: bool = option(False, "load weights only: iteration 0, fresh optimizer and RNG")
    no_load_optim: bool = option(False, "do not restore the optimizer state")
    no_load_rng: bool = option(False, "do not restore the RNG states")
    no_verify_checkpoint: bool = option(False, "load checkpoint files without checking them against their "
                                               "iteration's manifest.json checksums (a file changed after saving "
                                               "is otherwise refused)")

    def check(self) -> None:
        require(self.save_interval is None or self.save_interval >= 1, "--save-interval must be >= 1")
        require(self.save_interval is None or self.save is not None, "--save-interval needs --save")


@dataclass
class DataConfig(Section):
    """Preprocessed shards (pairwise; unpaired for --stage kto) and their train/valid/test split."""

    data_path: list[str] | None = option(None, "a preprocess_data.py --output-prefix, or weighted prefixes "
                                               "'W1 P1 W2 P2' to blend (required to train)")
    split: str = option("98,2,0", "train,valid,test weights over each data set's pairs")
    is_pairwise_dataset: bool = option(False, "accepted for MindSpeed-LLM scripts, and ignored: --stage decides the "
                                              "data (pairwise; unpaired for kto)")
    pack_sequences: bool = option(False, "concatenate each micro-batch's sequences into one row (megatron's THD "
                                         "layout, attention within each sequence) instead of padding every row")
    shared_prompt: bool = option(False, "each pair as one sequence [prompt | chosen | rejected], the prompt computed "
                                        "once: the rejected answer attends to the prompt and itself, never to the "
                                        "chosen one, its positions continuing from the prompt's end (local layer "
                                        "spec with SDPA attention)")

    def check(self) -> None:
        self.split_fractions  # parses, or raises naming --split
        if self.data_path is not None:
            self.prefixes_and_weights

    @property
    def split_fractions(self) -> list[float]:
        """--split "98,2,0" -> normalized train/valid/test weights."""
        parts = [p.strip() for p in re.split(r"[,/]", self.split)]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--split {self.split!r} must be up to three comma-separated numbers, "
                              "e.g. 98,2,0") from None
        require(1 <= len(weights) <= 3 and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0,
                f"--split {self.split!r} must be one to three non-negative numbers with a positive sum")
        weights += [0.0] * (3 - len(weights))
        return [w / sum(weights) for w in weights]

    @property
    def prefixes_and_weights(self) -> tuple[list[str], list[float] | None]:
        """--data-path: prefixes, or weight/prefix pairs; returns (prefixes, weights or None)."""
        data_path = self.data_path
        require(bool(data_path), "--data-path is empty")
        if len(data_path) == 1:
            return [data_path[0]], None
        weights = [_number(w) for w in data_path[0::2]]
        if None in weights or len(data_path) % 2:
            require(not any(_number(p) is not None for p in data_path),
                    f"--data-path {data_path}: give either prefixes only or weight/prefix pairs ('0.3 A 0.7 B')")
            return list(data_path), None
        prefixes = list(data_path[1::2])
        require(not any(_number(p) is not None for p in prefixes),
                f"--data-path {data_path}: expected weight/prefix pairs, found a number in a prefix slot")
        require(all(math.isfinite(w) and w > 0 for w in weights),
                f"--data-path {data_path}: blend weights must be positive numbers, got {weights}")
        return prefixes, weights


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class PreferenceConfig(Section):
    """The preference objective and where its reference policy comes from.

    Flags that only some stages or losses read default to None, so that "not given" is told
    apart from a default value: a flag that does not apply to the chosen stage or loss is an
    error, never ignored. `check` then fills in the defaults of the flags that apply.
    """

    stage: str = option("dpo", stage_summary(), choices=STAGES)
    dpo_loss_type: list[str] | None = option(
        None, "; ".join(f"{'one or more' if traits.several_losses else 'one'} of: {', '.join(traits.loss_types)} "
                        f"(--stage {stage}, default {' '.join(traits.defaults['dpo_loss_type'])})"
                        for stage, traits in STAGE_TRAITS.items() if traits.loss_types), metavar="LOSS")
    dpo_loss_weights: list[float] | None = option(None, "one weight per --dpo-loss-type: the loss is the weighted "
                                                        f"sum ({option_note('dpo_loss_weights')}; default all 1)",
                                                  metavar="W")
    dpo_beta: float | None = option(None, "KL strength (temperature of the implicit reward) "
                                          f"({option_note('dpo_beta')})")
    dpo_label_smoothing: float = option(0.0, "label noise in [0, 0.5) of the sigmoid-family losses (cDPO, robust, "
                                             "exo_pair, sigmoid_norm, aot, aot_unpaired, simpo)")
    discopop_tau: float | None = option(None, f"DiscoPOP's mixing temperature ({option_note('discopop_tau')})")
    reference_free: bool = option(False, "--stage dpo against a uniform reference (log-probs 0): no reference model")
    ld_alpha: float | None = option(None, "LD-DPO: log-probs of the answer tokens past the pair's shorter answer "
                                          "are scaled by alpha in [0, 1], for policy and reference alike (losses on "
                                          f"summed log-probs; {option_note('ld_alpha')})")
    rpo_alpha: float | None = option(None, "RPO: weight of the chosen answers' NLL (token mean per pair, as the RPO "
                                           "paper and MindSpeed-LLM; --dpo-loss-type sft is TRL's mean over the "
                                           f"batch's tokens) added to the loss ({option_note('rpo_alpha')})")
    pref_ftx: float = option(0.0, "the same NLL weight under LLaMA-Factory's name (exclusive with --rpo-alpha)")
    simpo_beta: float | None = option(None, f"SimPO's reward scale ({option_note('simpo_beta')})")
    simpo_gamma: float | None = option(None, "SimPO's target reward margin, in reward units: loss -logsigmoid(beta "
                                             "(mean logp_c - mean logp_r) - gamma) "
                                             f"({option_note('simpo_gamma')})")
    cpo_alpha: float | None = option(None, "weight of the chosen answers' NLL (token mean over the global batch's "
                                           "answer tokens, as TRL's CPOTrainer; 0: pure SimPO) "
                                           f"({option_note('cpo_alpha')})")
    orpo_beta: float | None = option(None, "ORPO's lambda, the weight of the odds-ratio term beside the NLL "
                                           f"({option_note('orpo_beta')})")
    orpo_prompt_loss: bool | None = option(None, "ORPO's NLL over the chosen sequences' prompt and answer tokens "
                                                 "(the ORPO authors' default and TRL's), or with --no-orpo-prompt-loss "
                                                 "over their answer tokens only; a token mean over the global batch "
                                                 f"either way ({option_note('orpo_prompt_loss')})", negatable=True)
    kto_desirable_weight: float | None = option(None, "weight of the desirable (thumbs-up) samples' losses (TRL's "
                                                      f"desirable_weight) ({option_note('kto_desirable_weight')})")
    kto_undesirable_weight: float | None = option(None, "weight of the undesirable (thumbs-down) samples' losses "
                                                        "(TRL's undesirable_weight) "
                                                        f"({option_note('kto_undesirable_weight')})")
    center_rewards_coefficient: float | None = option(
        None, "weight of the mean squared sum of the pair's rewards, (r_chosen + r_rejected)^2, added to the loss so "
              "rewards stay centred on zero (TRL's RewardConfig, Eisenstein et al. 2023) "
              f"({option_note('center_rewards_coefficient')})")
    ref_model: str | None = option(None, "checkpoint directory of the reference policy (default: --load's)")
    refer_model_iter: int | None = option(None, "on resume, load the reference from this iteration of --ref-model or "
                                                "--load (default: the reference the checkpoint records, else 1)")
    precompute_ref_logps: bool = option(False, "one reference pass over the data, cached: training then holds no "
                                               "reference model")

    def check(self) -> None:
        stage, traits = self.stage, self.traits
        if isinstance(self.dpo_loss_type, str):
            self.dpo_loss_type = [self.dpo_loss_type]
        for name in STAGE_OPTIONS:
            require(name in traits.options or getattr(self, name) is None,
                    f"--{name.replace('_', '-')} does not apply to --stage {stage}")
        require(traits.reference or not self.reference_free,
                f"--reference-free: --stage {stage} is reference-free already")
        require(traits.data == "pairwise" or not self.reference_free,
                f"--reference-free does not apply to --stage {stage}: its KL reference point needs a reference model")
        require(traits.nll_per_pair or self.pref_ftx == 0, f"--pref-ftx does not apply to --stage {stage}"
                + (f" (use --{traits.nll_weight.replace('_', '-')})" if traits.nll_weight else
                   "" if traits.value_head else " (its NLL term is built in)"))

        for name, value in traits.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, copy.copy(value))
        for name in ("dpo_beta", "simpo_beta", "orpo_beta"):
            require(getattr(self, name) is None or getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0")
        require(self.cpo_alpha is None or self.cpo_alpha >= 0, "--cpo-alpha must be >= 0")
        for name in ("kto_desirable_weight", "kto_undesirable_weight"):
            require(getattr(self, name) is None or getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0")
        require(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                "--center-rewards-coefficient must be >= 0")
        for name in self.dpo_loss_type or []:
            require(name in traits.loss_types, f"--dpo-loss-type {name} does not apply to --stage {stage}: "
                                               f"choose from {', '.join(traits.loss_types)}")
        types = self.loss_types
        require(len(set(types)) == len(types), "--dpo-loss-type names a loss twice")
        require(traits.several_losses or len(types) <= 1, f"--stage {stage} takes one --dpo-loss-type")
        if self.dpo_loss_weights is not None:
            require(
                len(self.dpo_loss_weights) == len(types),
                f"--dpo-loss-weights has {len(self.dpo_loss_weights)} values for {len(types)} --dpo-loss-type "
                f"({' '.join(types)})",
            )
            require(all(w > 0 for w in self.dpo_loss_weights), "--dpo-loss-weights must be > 0")

        require(self.simpo_gamma is None or "simpo" in types,
                f"--simpo-gamma applies to --stage simpo and to --stage cpo --dpo-loss-type simpo, "
                f"not to --stage {stage}" + (f" --dpo-loss-type {' '.join(types)}" if traits.loss_types else ""))

        require(0.0 <= self.dpo_label_smoothing < 0.5, "--dpo-label-smoothing must be in [0, 0.5)")
        smoothed = [name for name, traits in LOSS_TRAITS.items() if traits.label_smoothing]
        require(
            self.dpo_label_smoothing == 0.0 or any(t in LOSS_TRAITS and LOSS_TRAITS[t].label_smoothing for t in types),
            f"--dpo-label-smoothing applies to the losses {', '.join(smoothed)}; "
            f"not to --stage {stage}" + (f" --dpo-loss-type {' '.join(types)}" if traits.loss_types else ""),
        )
        require(self.discopop_tau is None or "discopop" in types, "--discopop-tau needs --dpo-loss-type discopop")
        require(self.discopop_tau is None or self.discopop_tau > 0, "--discopop-tau must be > 0")
        for loss in (LOSS_TRAITS[name] for name in types if name in LOSS_TRAITS):  # kto's loss is not catalogued
            for name, value in loss.defaults.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.ld_alpha is not None:
            require(0.0 <= self.ld_alpha <= 1.0, "--ld-alpha must be in [0, 1]")
            averaged = [t for t in types if LOSS_TRAITS[t].average_logps]
            require(not averaged, f"--ld-alpha desensitizes summed log-probs; --dpo-loss-type {' '.join(averaged)} "
                                   "already normalizes by length")
        require(self.rpo_alpha is None or self.rpo_alpha >= 0, "--rpo-alpha must be >= 0")
        require(self.pref_ftx >= 0, "--pref-ftx must be >= 0")
        require(self.rpo_alpha is None or self.pref_ftx == 0,
                 "--rpo-alpha and --pref-ftx both weight the chosen NLL: set one")

        if not self.uses_reference:
            why = "--reference-free" if traits.reference else f"--stage {stage}"
            for name in ("ref_model", "refer_model_iter"):
                require(getattr(self, name) is None,
                         f"--{name.replace('_', '-')} does not apply: {why} builds no reference model")
            require(not self.precompute_ref_logps,
                     f"--precompute-ref-logps does not apply: {why} builds no reference model")
        require(self.refer_model_iter is None or self.refer_model_iter >= 1, "--refer-model-iter must be >= 1")

    @property
    def traits(self) -> StageTraits:
        return STAGE_TRAITS[self.stage]

    @property
    def uses_reference(self) -> bool:
        """False for reference-free objectives: no reference model is built or run."""
        return self.traits.reference and not self.reference_free

    @property
    def loss_types(self) -> list[str]:
        if self.traits.value_head:
            return []  # the reward model's Bradley-Terry loss is the stage's own, not a log-prob loss
        return list(self.dpo_loss_type or []) if self.traits.loss_types else [self.stage]

    @property
    def loss_terms(self) -> list[tuple[float, str]]:
        """(weight, loss name) of each term of the preference loss."""
        types = self.loss_types
        return list(zip(self.dpo_loss_weights or [1.0] * len(types), types))

    @property
    def beta(self) -> float:
        """The beta of the stage (--orpo-beta is ORPO's lambda); None under rm."""
        return getattr(self, self.traits.beta) if self.traits.beta else None

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen NLL added to the preference loss: a token mean per pair under --stage dpo
        (--rpo-alpha / --pref-ftx), over the global batch's tokens under cpo, simpo and orpo."""
        if self.traits.value_head:
            return 0.0
        if self.traits.nll_weight is None:
            return 1.0
        weight = getattr(self, self.traits.nll_weight)
        return self.pref_ftx if weight is None and self.traits.nll_per_pair else weight

    def describe(self) -> str:
        """The objective and every hyper-parameter in effect, for the startup log."""
        if self.traits.data == "unpaired":
            return (f"{self.stage}: loss = {self.kto_desirable_weight:g}*(1 - sigmoid(beta (logratio - kl))) "
                    f"desirable, {self.kto_undesirable_weight:g}*(1 - sigmoid(beta (kl - logratio))) undesirable | "
                    f"--dpo-beta {self.beta:g}, kl: mean over the global batch of mismatched prompt/completion "
                    "log-ratios, clamped at 0, " + ("reference model" if self.uses_reference else "reference-free"))
        if self.traits.value_head:
            center = self.center_rewards_coefficient
            return ("rm: loss = -logsigmoid(r_chosen - r_rejected - margin)"
                    + (f" + {center:g}*(r_chosen + r_rejected)^2" if center else "")
                    + " | value head reward at each sequence's last token, per-pair margin from the data (0 if "
                      "absent), reference-free")
        types = self.loss_types
        terms = [t if (w, len(types)) == (1.0, 1) else f"{w:g}*{t}" for w, t in self.loss_terms]
        if self.nll_weight > 0:
            terms.append(f"{self.nll_weight:g}*nll")
        params = [f"--{self.traits.beta.replace('_', '-')} {self.beta:g}"]
        if any(LOSS_TRAITS[t].label_smoothing for t in types):
            params.append(f"--dpo-label-smoothing {self.dpo_label_smoothing:g}")
        if "simpo" in types:
            params.append(f"--simpo-gamma {self.simpo_gamma:g}")
        if "discopop" in types:
            params.append(f"--discopop-tau {self.discopop_tau:g}")
        if self.ld_alpha is not None:
            params.append(f"--ld-alpha {self.ld_alpha:g}")
        if "bco_pair" in types:
            params.append("bco delta: running mean reward, current batch included")
        averaged = [t for t in types if LOSS_TRAITS[t].average_logps]
        if averaged:
            params.append(f"token-averaged log-probs for {' '.join(averaged)}")
        params.append("reference model" if self.uses_reference else "reference-free")
        per_pair = self.traits.nll_per_pair
        if per_pair and self.nll_weight > 0:
            params.append("nll: chosen answer tokens, mean per pair")
        if (not per_pair and self.nll_weight > 0) or "sft" in types:
            tokens = {None: "answer tokens", False: "answer tokens (--no-orpo-prompt-loss)",
                      True: "prompt and answer tokens (--orpo-prompt-loss)"}[self.orpo_prompt_loss]
            params.append(f"{'sft' if per_pair else 'nll'}: mean over the global batch's chosen {tokens}")
        return f"{self.stage}: loss = {' + '.join(terms)} | {', '.join(params)}"


@dataclass
class LoggingConfig(Section):
    """Console, JSONL and TensorBoard metrics."""

    log_interval: int = option(1, "steps between metric lines")
    tensorboard_dir: str | None = option(None, "also write the metrics as TensorBoard events here")
    peak_tflops: float | None = option(None, "per-device peak for MFU; default a table of known GPUs, none on CPU")
    validate_only: bool = option(False, "check the flags (and that --load and --data-path exist) for WORLD_SIZE "
                                        "ranks, print the configuration, exit")

    def check(self) -> None:
        require(self.log_interval >= 1, "--log-interval must be >= 1")
        require(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be > 0")


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The megatron-core linears LoRA can adapt (names as in the GPT layer spec)."""


@dataclass
class LoraConfig(Section):
    """LoRA adapters on the decoder's linears (MindSpeed-LLM flag names); off unless --lora-r is set."""

    lora_r: int | None = option(None, "adapter rank; setting it turns LoRA on (base weights frozen, only adapters "
                                      "trained)")
    lora_alpha: float = option(32.0, "the adapter output is scaled by alpha / r")
    lora_dropout: float = option(0.0, "dropout on the adapter branch's input")
    lora_target_modules: list[str] = option(default_factory=lambda: list(LORA_TARGETS),
                                            help="megatron-core linears to adapt", choices=LORA_TARGETS)
    lora_load: str | None = option(None, "checkpoint directory whose adapters (and training state, if any) resume "
                                         "on --load's base")
    lora_ckpt_filter: bool = option(False, "checkpoints hold the adapter tensors only (plus optimizer and training "
                                           "state)")

    def check(self) -> None:
        require(self.lora_r is None or self.lora_r > 0, "--lora-r must be > 0")
        require(self.lora_alpha > 0, "--lora-alpha must be > 0")
        require(0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)")
        require(bool(self.lora_target_modules), "--lora-target-modules needs at least one module")
        require(self.lora_load is None or self.enabled, "--lora-load needs --lora-r (and --lora-alpha)")
        require(not self.lora_ckpt_filter or self.enabled, "--lora-ckpt-filter needs --lora-r")

    @property
    def enabled(self) -> bool:
        return self.lora_r is not None


TOKENIZER_TYPES = ("PretrainedFromHF", "SentencePieceTokenizer", "TiktokenTokenizer")


@dataclass
class TokenizerConfig(Section):
    """Which tokenizer to load (preprocessing; training reads --vocab-size from it when not given)."""

    tokenizer_type: str = option("PretrainedFromHF", "tokenizer backend", choices=TOKENIZER_TYPES)
    tokenizer_name_or_path: str | None = option(None, "HF tokenizer directory (PretrainedFromHF)")
    tokenizer_model: str | None = option(None, "SentencePiece .model or tiktoken rank file")
    tokenizer_not_use_fast: bool = option(False, "load the slow (Python) HF tokenizer")

    def check(self) -> None:
        if self.tokenizer_type == "PretrainedFromHF":
            require(bool(self.tokenizer_name_or_path),
                    "--tokenizer-name-or-path is required with --tokenizer-type PretrainedFromHF")
            require(os.path.isdir(self.tokenizer_name_or_path),
                    f"--tokenizer-name-or-path {self.tokenizer_name_or_path!r} is not a directory "
                    "(hub names are not resolved: download the tokenizer first)")
        else:
            require(bool(self.tokenizer_model), f"--tokenizer-model is required with --tokenizer-type "
                                                f"{self.tokenizer_type}")
            require(os.path.isfile(self.tokenizer_model), f"--tokenizer-model {self.tokenizer_model!r} is not a file")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TokenizerConfig:
        return section_from_args(cls, args)


@dataclass
class EngineConfig:
    """All sections of one run."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    tokenizer: TokenizerConfig | None = None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel_size

    @property
    def virtual_pipeline_size(self) -> int | None:
        """Model chunks per pipeline rank under the interleaved schedule (None without it)."""
        per_vpp = self.parallel.num_layers_per_virtual_pipeline_stage
        if per_vpp is None:
            return None
        return self.model.num_layers // self.parallel.pipeline_model_parallel_size // per_vpp

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab(self.parallel.tensor_model_parallel_size)


def check_layout(model: ModelConfig, tp: int, pp: int, num_layer_list: tuple[int, ...] | None,
                 tp_flag: str = "--tensor-model-parallel-size", pp_flag: str = "--pipeline-model-parallel-size") -> None:
    """Whether a TP x PP layout can hold the model: the one copy of these rules, for training and for the
    converters (which name their own layout flags, --target-tensor-parallel-size ...)."""
    for flag, value in (("--num-attention-heads", model.num_attention_heads),
                        ("--num-query-groups", model.num_query_groups), ("--ffn-hidden-size", model.ffn_hidden_size)):
        require(value % tp == 0, f"{flag} ({value}) must be divisible by {tp_flag} ({tp})")
    if num_layer_list is None:
        require(model.num_layers % pp == 0, f"--num-layers ({model.num_layers}) must be divisible by {pp_flag} "
                                            f"({pp}); pass --num-layer-list for an uneven split")
    else:
        require(sum(num_layer_list) == model.num_layers,
                f"--num-layer-list {','.join(map(str, num_layer_list))} sums to {sum(num_layer_list)}, not "
                f"--num-layers ({model.num_layers})")
    if model.padded_vocab_size is not None:
        require(model.padded_vocab_size % tp == 0,
                f"--padded-vocab-size ({model.padded_vocab_size}) must be divisible by {tp_flag} ({tp})")
        require(model.vocab_size is None or model.padded_vocab_size >= model.vocab_size,
                f"--padded-vocab-size ({model.padded_vocab_size}) is smaller than --vocab-size ({model.vocab_size})")


def check_expert_layout(model: ModelConfig, moe: MoEConfig, tp: int, ep: int, etp: int,
                        ep_flag: str = "--expert-model-parallel-size",
                        etp_flag: str = "--expert-tensor-parallel-size",
                        tp_flag: str = "--tensor-model-parallel-size") -> None:
    """Whether EP x ETP can hold the experts (training and the converters, which name their own flags)."""
    if not moe.enabled:
        require(ep == 1 and etp == tp, f"{ep_flag} and {etp_flag} need --num-experts (a dense model has no experts)")
        return
    require(moe.num_experts % ep == 0, f"--num-experts ({moe.num_experts}) must be divisible by {ep_flag} ({ep})")
    freq = moe.moe_layer_freq
    require(isinstance(freq, int) or len(freq) == model.num_layers,
            f"--moe-layer-freq has {len(freq) if not isinstance(freq, int) else 0} entries, --num-layers "
            f"{model.num_layers}: the pattern needs one 0 (dense) or 1 (MoE) per layer")
    require(any(moe.layer_pattern(model.num_layers)),
            "--moe-layer-freq makes no layer an MoE layer: drop --num-experts for a dense model")
    ffn = moe.expert_ffn(model)
    require(ffn % etp == 0, f"--moe-ffn-hidden-size ({ffn}) must be divisible by {etp_flag} ({etp})")
    require(tp % etp == 0,
            f"{etp_flag} ({etp}) must divide {tp_flag} ({tp}): checkpoint files are named by TP and EP rank only "
            "(Megatron-LM's mp_rank_TT[_PPP]_EEE), so each holds one expert-TP slice (TP rank % ETP); with ETP "
            "above TP several expert-TP ranks would share one file")
    shared = moe.moe_shared_expert_intermediate_size
    require(shared is None or shared % tp == 0, f"--moe-shared-expert-intermediate-size ({shared}) must be divisible "
                                                 f"by --tensor-model-parallel-size ({tp})")


def validate(config: EngineConfig, world_size: int) -> None:
    """Rules that span sections; raises ConfigError naming the flags before any work is done."""
    model, par, train = config.model, config.parallel, config.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
        f"--pipeline-model-parallel-size ({pp})",
    )
    dp = world_size // (tp * pp)
    check_layout(model, tp, pp, par.num_layer_list)
    moe, ep, etp = config.moe, par.expert_model_parallel_size, par.expert_tensor_size
    check_expert_layout(model, moe, tp, ep, etp)
    if moe.enabled:
        require(
            world_size % (etp * ep * pp) == 0,
            f"world size {world_size} is not divisible by --expert-tensor-parallel-size ({etp}) x "
            f"--expert-model-parallel-size ({ep}) x --pipeline-model-parallel-size ({pp}): the ranks of each "
            "pipeline stage are split into expert groups",
        )
        require(tp == 1 or par.sequence_parallel,
                f"--num-experts with --tensor-model-parallel-size {tp} needs --sequence-parallel (megatron-core's "
                "MoE layer refuses tensor parallelism without it in training)")
        require(not (moe.moe_token_dispatcher_type == "allgather" and config.data.pack_sequences),
                "--pack-sequences needs --moe-token-dispatcher-type alltoall: the allgather dispatcher needs every "
                "micro-batch at one length (--seq-length), and a packed row's length varies")
    if par.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = model.num_layers // pp
        require(
            per_stage % par.num_layers_per_virtual_pipeline_stage == 0,
            f"layers per pipeline stage ({per_stage} = --num-layers / --pipeline-model-parallel-size) must be "
            f"divisible by --num-layers-per-virtual-pipeline-stage ({par.num_layers_per_virtual_pipeline_stage})",
        )
    require(
        not (config.lora.enabled and config.model.transformer_impl == "transformer_engine"),
        "--transformer-impl transformer_engine cannot be combined with --lora-r: LoRA adapts megatron-core's local "
        "linears, TE's fused layers have none; use --transformer-impl auto or local (same model, local layers)",
    )
    require(
        not (config.data.shared_prompt and (model.transformer_impl == "transformer_engine"
                                            or model.attention_backend == "unfused")),
        "--shared-prompt needs the local layer spec with SDPA attention: drop --transformer-impl transformer_engine "
        "and --attention-backend unfused (--transformer-impl auto takes the local spec under --shared-prompt)",
    )
    pref = config.preference
    for flag, given in (("--shared-prompt", config.data.shared_prompt),
                        ("--max-tokens-per-micro-batch", train.max_tokens_per_micro_batch is not None)):
        require(not (given and (pref.traits.value_head or pref.traits.data == "unpaired")),
                f"{flag} cannot be combined with --stage {pref.stage}: it is built for the pairwise objectives "
                f"(dpo, simpo, orpo, cpo); drop {flag}")
    require(not (config.data.shared_prompt and moe.enabled),
            "--shared-prompt cannot be combined with --num-experts: the router would see a pair's shared prompt once "
            "instead of once per sequence (other load-balancing loss and expert loads); drop --shared-prompt")
    require(
        not (config.lora.enabled and config.preference.ref_model),
        "--ref-model cannot be combined with --lora-r: the LoRA reference is the base model with adapters off",
    )
    if train.global_batch_size is None:
        train.global_batch_size = train.micro_batch_size * dp
    require(
        train.global_batch_size % (train.micro_batch_size * dp) == 0,
        f"--global-batch-size ({train.global_batch_size}) must be divisible by --micro-batch-size "
        f"({train.micro_batch_size}) x data-parallel size ({dp} = world {world_size} / (TP {tp} x PP {pp}))",
    )
    budget = train.max_tokens_per_micro_batch
    if budget is not None:
        require(budget >= 2 * model.seq_length,
                f"--max-tokens-per-micro-batch ({budget}) must hold the longest pair: at least 2 x --seq-length "
                f"({2 * model.seq_length})")
        sorted_losses = [name for name in SORTED_LOSS_TYPES if name in config.preference.loss_types]
        require(not sorted_losses,
                f"--dpo-loss-type {' '.join(sorted_losses)} sorts over the pairs of a micro-batch, which a token "
                "budget would change: use --micro-batch-size without --max-tokens-per-micro-batch")
    if par.num_layers_per_virtual_pipeline_stage is not None:
        microbatches = train.global_batch_size // (train.micro_batch_size * dp)
        require(
            microbatches % pp == 0,
            f"the interleaved schedule needs the number of micro-batches ({microbatches}) to be a multiple of "
            f"--pipeline-model-parallel-size ({pp}); adjust --global-batch-size",
        )
    require(
        config.preference.traits.data == "pairwise" or train.micro_batch_size >= 2,
        f"--stage {config.preference.stage} pairs each prompt with another completion of its micro-batch for its KL "
        "reference point (TRL's KTOTrainer); with --micro-batch-size 1 there is none: use --micro-batch-size >= 2",
    )
    for name in SORTED_LOSS_TYPES:
        require(
            name not in config.preference.loss_types or train.micro_batch_size >= 2,
            f"--dpo-loss-type {name} sorts log-ratios over the pairs of a micro-batch; with --micro-batch-size 1 "
            "it is the sigmoid loss: use --micro-batch-size >= 2",
        )


SECTIONS = {
    "model": (ModelConfig, "model"), "parallel": (ParallelConfig, "parallel"),
    "precision": (PrecisionConfig, "precision"), "training": (TrainingConfig, "training"),
    "checkpoint": (CheckpointConfig, "checkpoint"), "logging": (LoggingConfig, "logging"),
    "data": (DataConfig, "data"), "preference": (PreferenceConfig, "preference optimization"),
    "lora": (LoraConfig, "lora"), "moe": (MoEConfig, "mixture of experts"),
    "tokenizer": (TokenizerConfig, "tokenizer"),
}
"""EngineConfig field -> (section, argument group title): the parser and the config are built from this."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The engine's parser, generated from the sections; unknown flags are an error, never ignored."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    for section, title in SECTIONS.values():
        add_options(parser, section, title)
    return parser


def config_from_args(args: argparse.Namespace,
                     vocab_size_of: Callable[[TokenizerConfig], int] | None = None) -> EngineConfig:
    """The sections from parsed flags. With tokenizer flags and no --vocab-size, `vocab_size_of`
    (the tokenizer layer's loader, passed in by the entry point) reads the vocabulary size."""
    tokenizer = None
    if any(hasattr(args, f.name) for f in fields(TokenizerConfig)):
        tokenizer = TokenizerConfig.from_args(args)
    model_overrides = {}
    if tokenizer is not None and vocab_size_of is not None and not (hasattr(args, "vocab_size")
                                                                    or hasattr(args, "padded_vocab_size")):
        model_overrides["vocab_size"] = vocab_size_of(tokenizer)
    sections = {name: section_from_args(section, args) for name, (section, _) in SECTIONS.items()
                if name not in ("model", "tokenizer")}
    return EngineConfig(model=section_from_args(ModelConfig, args, **model_overrides), tokenizer=tokenizer,
                        **sections)


def check_inputs(config: EngineConfig) -> None:
    """What a training start reads before building anything: the flags it cannot run without, the
    checkpoint to start from and the preprocessed data. `--validate-only` runs this too."""
    for flag, value, what in (
        ("--data-path", config.data.data_path, "the --output-prefix given to preprocess_data.py"),
        ("--load", config.checkpoint.load, "a checkpoint from tools/checkpoint/convert_ckpt.py or a previous run "
                                           "(the policy starts from it and the reference is a copy)"),
        ("--train-iters", config.training.train_iters, "the number of optimizer steps"),
    ):
        require(value is not None, f"pretrain_dpo.py needs {flag}: {what}")
    for flag, directory in (("--load", config.checkpoint.load), ("--ref-model", config.preference.ref_model),
                            ("--lora-load", config.lora.lora_load)):
        require(directory is None or os.path.isdir(directory), f"{flag} {directory}: no such directory")
    prefixes, _ = config.data.prefixes_and_weights
    keys = UNPAIRED_KEYS if config.preference.traits.data == "unpaired" else OUTPUT_KEYS
    for prefix in prefixes:
        message = missing_shards_message(prefix, keys)
        require(message is None, message or "")


def plain_config(config: EngineConfig) -> dict:
    """Every section as plain Python values: printable, JSON-able, torch.load-safe."""
    return {f.name: asdict(getattr(config, f.name)) for f in fields(config) if getattr(config, f.name) is not None}


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None,
               vocab_size_of: Callable[[TokenizerConfig], int] | None = None,
               for_training: bool = False) -> EngineConfig:
    """Parse, build the config sections and validate them against the world size (and, for a
    training start, the inputs on disk: `check_inputs`).

    A ConfigError becomes an argparse error (usage line + message, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = config_from_args(args, vocab_size_of)
        validate(config, world_size)
        if for_training:
            check_inputs(config)
    except ConfigError as err:
        parser.error(str(err))
    return config
