"""One argparse with Megatron-LM flag names, turned once into typed config sections.

Users carry launch scripts over from Megatron-LM and MindSpeed-LLM, so flag names
follow theirs. Below the entry point nothing reads argparse output: each section
is a dataclass that validates itself and names the flag in its errors, and
`validate()` checks the rules that span sections (batch sizes against the layout).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from engine.dpo.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, LOSSES, SORTED_LOSS_TYPES
from engine.tokenizer import TokenizerConfig, add_tokenizer_args, build_tokenizer


class ConfigError(ValueError):
    """A flag combination that cannot run; the message names the flags and the rule."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _from_namespace(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


@dataclass
class ModelConfig:
    """Decoder architecture (Llama / Mistral / Qwen2 / Qwen3 family)."""

    num_layers: int
    """--num-layers: transformer layers."""
    hidden_size: int
    """--hidden-size."""
    num_attention_heads: int
    """--num-attention-heads."""
    seq_length: int
    """--seq-length: longest training sequence (tokens)."""
    ffn_hidden_size: int | None = None
    """--ffn-hidden-size; default 4 x hidden size."""
    group_query_attention: bool = False
    """--group-query-attention: use --num-query-groups key/value heads."""
    num_query_groups: int | None = None
    """--num-query-groups: key/value heads under GQA."""
    kv_channels: int | None = None
    """--kv-channels: head dim; default hidden / heads (Qwen3 sets it explicitly)."""
    max_position_embeddings: int | None = None
    """--max-position-embeddings; default --seq-length."""
    position_embedding_type: str = "rope"
    """--position-embedding-type: rope or learned_absolute."""
    rotary_base: int = 10000
    """--rotary-base: RoPE theta."""
    rope_scaling_type: str | None = None
    """--rope-scaling-type llama3 (or --use-rope-scaling): Llama 3.1 frequency scaling."""
    rope_scaling_factor: float = 8.0
    """--rope-scaling-factor."""
    low_freq_factor: float = 1.0
    """--low-freq-factor (llama3 rope scaling)."""
    high_freq_factor: float = 4.0
    """--high-freq-factor (llama3 rope scaling)."""
    original_max_position_embeddings: int = 8192
    """--original-max-position-embeddings (llama3 rope scaling)."""
    normalization: str = "RMSNorm"
    """--normalization: RMSNorm or LayerNorm."""
    norm_epsilon: float = 1e-5
    """--norm-epsilon."""
    swiglu: bool = False
    """--swiglu: gated SiLU MLP (gate and up fused in linear_fc1)."""
    disable_bias_linear: bool = False
    """--disable-bias-linear: no biases in linear layers."""
    add_qkv_bias: bool = False
    """--add-qkv-bias: bias on linear_qkv only (Qwen2)."""
    qk_layernorm: bool = False
    """--qk-layernorm: per-head RMSNorm on queries and keys (Qwen3)."""
    untie_embeddings_and_output_weights: bool = False
    """--untie-embeddings-and-output-weights."""
    vocab_size: int | None = None
    """--vocab-size: tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """--make-vocab-size-divisible-by: padded vocab is a multiple of this x TP."""
    padded_vocab_size: int | None = None
    """--padded-vocab-size: explicit padded size (overrides the rounding rule)."""
    init_method_std: float = 0.02
    """--init-method-std."""
    hidden_dropout: float = 0.0
    """--hidden-dropout."""
    attention_dropout: float = 0.0
    """--attention-dropout."""
    transformer_impl: str = "auto"
    """--transformer-impl: transformer_engine, local, or auto (TE when importable)."""
    attention_backend: str = "auto"
    """--attention-backend for the local spec: sdpa (torch scaled_dot_product_attention),
    unfused (megatron's DotProductAttention), or auto (sdpa)."""

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if not self.group_query_attention:
            _require(
                self.num_query_groups in (None, self.num_attention_heads),
                "--num-query-groups needs --group-query-attention",
            )
            self.num_query_groups = self.num_attention_heads
        _require(
            self.num_query_groups is not None,
            "--group-query-attention needs --num-query-groups",
        )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "num_query_groups"):
            _require(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({self.num_query_groups})",
        )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}), or set --kv-channels",
            )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _require(
            self.seq_length <= self.max_position_embeddings,
            f"--seq-length ({self.seq_length}) exceeds --max-position-embeddings "
            f"({self.max_position_embeddings})",
        )
        _require(self.normalization in ("RMSNorm", "LayerNorm"), "--normalization must be RMSNorm or LayerNorm")
        _require(
            self.position_embedding_type in ("rope", "learned_absolute"),
            "--position-embedding-type must be rope or learned_absolute",
        )
        _require(self.rope_scaling_type in (None, "llama3"), "--rope-scaling-type supports llama3 only")
        _require(
            self.transformer_impl in ("auto", "transformer_engine", "local"),
            "--transformer-impl must be auto, transformer_engine or local",
        )
        _require(
            self.attention_backend in ("auto", "sdpa", "unfused"),
            "--attention-backend must be auto, sdpa or unfused",
        )
        _require(
            self.vocab_size is not None or self.padded_vocab_size is not None,
            "the model needs --vocab-size (tokenizer size), --padded-vocab-size, or tokenizer flags to read it from",
        )

    def padded_vocab(self, tensor_model_parallel_size: int) -> int:
        """Vocab rows of the embedding: the tokenizer size rounded up so every TP shard is equal."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Tensor, pipeline and data parallel layout."""

    tensor_model_parallel_size: int = 1
    """--tensor-model-parallel-size."""
    pipeline_model_parallel_size: int = 1
    """--pipeline-model-parallel-size."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """--num-layers-per-virtual-pipeline-stage: interleaved 1F1B schedule."""
    num_layer_list: tuple[int, ...] | None = None
    """--num-layer-list: decoder layers of each pipeline stage, e.g. 3,5 (uneven PP, as in MindSpeed-LLM);
    default an even split. Must match the checkpoint's split (convert_ckpt.py --num-layer-list)."""
    sequence_parallel: bool = False
    """--sequence-parallel: shard norms/dropout activations over TP (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """--use-distributed-optimizer: shard optimizer state over DP (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """--overlap-grad-reduce: overlap DP grad reduction with backward."""
    overlap_param_gather: bool = False
    """--overlap-param-gather (distributed optimizer only)."""
    distributed_backend: str | None = None
    """--distributed-backend: nccl or gloo; default nccl on CUDA, gloo on CPU."""
    distributed_timeout_minutes: int = 10
    """--distributed-timeout-minutes."""
    recompute_granularity: str | None = None
    """--recompute-granularity: full (whole layers) or selective (core attention) activation recomputation."""
    recompute_method: str | None = None
    """--recompute-method (full only): uniform (every N layers as a group) or block (the first N per stage)."""
    recompute_num_layers: int | None = None
    """--recompute-num-layers (full only): N for --recompute-method."""

    def __post_init__(self) -> None:
        _require(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        _require(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1",
        )
        _require(
            self.num_layers_per_virtual_pipeline_stage is None or self.pipeline_model_parallel_size > 1,
            "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
        )
        if self.num_layer_list is not None:
            layers = ",".join(map(str, self.num_layer_list))
            _require(
                len(self.num_layer_list) == self.pipeline_model_parallel_size and min(self.num_layer_list) > 0,
                f"--num-layer-list {layers} needs one positive count per pipeline stage "
                f"(--pipeline-model-parallel-size {self.pipeline_model_parallel_size})",
            )
            _require(
                self.num_layers_per_virtual_pipeline_stage is None,
                "--num-layer-list cannot be combined with --num-layers-per-virtual-pipeline-stage",
            )
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer",
        )
        _require(self.distributed_backend in (None, "nccl", "gloo"), "--distributed-backend must be nccl or gloo")
        _require(
            self.recompute_granularity in (None, "full", "selective"),
            "--recompute-granularity must be full or selective",
        )
        if self.recompute_granularity == "full":
            _require(
                self.recompute_method in ("uniform", "block") and (self.recompute_num_layers or 0) >= 1,
                "--recompute-granularity full needs --recompute-method uniform|block and --recompute-num-layers >= 1",
            )
        else:
            _require(
                self.recompute_method is None and self.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only",
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


@dataclass
class PrecisionConfig:
    """Parameter and compute precision."""

    bf16: bool = False
    """--bf16: bf16 params with fp32 main weights and grads."""
    fp16: bool = False
    """--fp16: fp16 params with dynamic loss scaling."""
    attention_softmax_in_fp32: bool = False
    """--attention-softmax-in-fp32."""
    initial_loss_scale: float = 2.0**32
    """--initial-loss-scale (fp16)."""

    def __post_init__(self) -> None:
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")

    @property
    def params_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass
class TrainingConfig:
    """Batch sizes, optimizer and learning-rate schedule."""

    micro_batch_size: int = 1
    """--micro-batch-size: samples per micro-batch per DP rank."""
    global_batch_size: int | None = None
    """--global-batch-size: samples per optimizer step; default micro x DP."""
    train_iters: int | None = None
    """--train-iters."""
    lr: float = 1e-5
    """--lr: peak learning rate."""
    min_lr: float = 0.0
    """--min-lr."""
    lr_decay_style: str = "cosine"
    """--lr-decay-style: constant, linear, cosine, inverse-square-root, WSD."""
    lr_decay_iters: int | None = None
    """--lr-decay-iters; default --train-iters."""
    lr_warmup_fraction: float | None = None
    """--lr-warmup-fraction of --lr-decay-iters (exclusive with --lr-warmup-iters)."""
    lr_warmup_iters: int = 0
    """--lr-warmup-iters."""
    lr_warmup_init: float = 0.0
    """--lr-warmup-init."""
    override_opt_param_scheduler: bool = False
    """--override-opt-param-scheduler (Megatron-LM): on resume, the schedule flags replace the checkpoint's
    schedule (its step count is kept)."""
    use_checkpoint_opt_param_scheduler: bool = False
    """--use-checkpoint-opt-param-scheduler (Megatron-LM): on resume, the checkpoint's schedule replaces the
    schedule flags. With neither, a resume whose schedule flags differ from the checkpoint's is refused."""
    weight_decay: float = 0.01
    """--weight-decay."""
    adam_beta1: float = 0.9
    """--adam-beta1."""
    adam_beta2: float = 0.999
    """--adam-beta2."""
    adam_eps: float = 1e-8
    """--adam-eps."""
    clip_grad: float = 1.0
    """--clip-grad: global grad-norm clip (0 disables)."""
    seed: int = 1234
    """--seed."""
    eval_interval: int | None = None
    """--eval-interval: iterations between evaluations on the valid split (None: never)."""
    eval_iters: int = 10
    """--eval-iters: global batches per evaluation."""
    max_skipped_iters: int = 10
    """--max-skipped-iters: stop after this many consecutive updates skipped for a non-finite loss or grad norm."""
    check_for_nan_in_loss_and_grad: bool = False
    """--check-for-nan-in-loss-and-grad: megatron's DDP raises on NaN gradients (instead of skipping)."""
    exit_signal_handler: bool = False
    """--exit-signal-handler: on SIGTERM/SIGINT, save a checkpoint at the next iteration and exit 0."""
    exit_interval: int | None = None
    """--exit-interval: save and exit when the iteration is a multiple of this."""
    exit_duration_in_mins: float | None = None
    """--exit-duration-in-mins: save and exit once the run has lasted this long."""

    def __post_init__(self) -> None:
        _require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        _require(self.eval_interval is None or self.eval_interval >= 1, "--eval-interval must be >= 1")
        _require(self.eval_iters >= 1, "--eval-iters must be >= 1")
        _require(self.max_skipped_iters >= 1, "--max-skipped-iters must be >= 1")
        _require(self.exit_interval is None or self.exit_interval >= 1, "--exit-interval must be >= 1")
        _require(
            self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
            "--exit-duration-in-mins must be > 0",
        )
        _require(self.train_iters is None or self.train_iters >= 1, "--train-iters must be >= 1")
        _require(self.lr >= 0 and self.min_lr >= 0, "--lr and --min-lr must be >= 0")
        _require(self.min_lr <= self.lr, f"--min-lr ({self.min_lr}) exceeds --lr ({self.lr})")
        _require(
            self.lr_decay_style in ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
            "--lr-decay-style must be constant, linear, cosine, inverse-square-root or WSD",
        )
        _require(
            self.lr_warmup_fraction is None or self.lr_warmup_iters == 0,
            "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive",
        )
        _require(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually exclusive",
        )
        _require(
            self.lr_warmup_fraction is None or 0.0 <= self.lr_warmup_fraction <= 1.0,
            "--lr-warmup-fraction must be in [0, 1]",
        )
        _require(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "--adam-beta1/2 must be in [0, 1)")
        _require(self.clip_grad >= 0, "--clip-grad must be >= 0")


@dataclass
class CheckpointConfig:
    """Where to load from and save to (Megatron-LM checkpoint layout)."""

    load: str | None = None
    """--load: checkpoint directory to start from."""
    save: str | None = None
    """--save: directory for new checkpoints."""
    save_interval: int | None = None
    """--save-interval: iterations between checkpoints (and one at the end)."""
    finetune: bool = False
    """--finetune: load weights only, start at iteration 0 with fresh optimizer and RNG."""
    no_load_optim: bool = False
    """--no-load-optim."""
    no_load_rng: bool = False
    """--no-load-rng."""
    no_verify_checkpoint: bool = False
    """--no-verify-checkpoint: load checkpoint files without checking them against their iteration's
    manifest.json checksums (a file that changed after saving is otherwise refused)."""

    def __post_init__(self) -> None:
        _require(self.save_interval is None or self.save_interval >= 1, "--save-interval must be >= 1")
        _require(self.save_interval is None or self.save is not None, "--save-interval needs --save")


@dataclass
class DataConfig:
    """Preprocessed pairwise shards and their train/valid/test split."""

    data_path: list[str] | None = None
    """--data-path: a preprocess_data.py --output-prefix, or weighted prefixes 'W1 P1 W2 P2' to blend."""
    split: str = "98,2,0"
    """--split: train,valid,test weights over each data set's pairs."""
    is_pairwise_dataset: bool = False
    """--is-pairwise-dataset: accepted for MindSpeed-LLM scripts; pairwise data is the only kind."""
    pack_sequences: bool = False
    """--pack-sequences: concatenate each micro-batch's sequences into one row (megatron's THD
    layout, attention within each sequence) instead of padding every row to the longest."""


STAGES = ("dpo", "simpo", "orpo", "cpo")
"""--stage choices; all but dpo are reference-free (no reference model is built)."""


@dataclass
class PreferenceConfig:
    """The preference objective and where its reference policy comes from.

    Flags that only some stages or losses read default to None, so that "not given" is told
    apart from a default value: a flag that does not apply to the chosen stage or loss is an
    error, never ignored. `__post_init__` then fills in the defaults of the flags that apply.
    """

    stage: str = "dpo"
    """--stage: dpo (policy against a reference policy), or the reference-free simpo, orpo, cpo."""
    dpo_loss_type: list[str] | None = None
    """--dpo-loss-type: under --stage dpo one or more of engine.dpo.losses.DPO_LOSS_TYPES (default
    sigmoid); under --stage cpo one of sigmoid, hinge, ipo, simpo (default sigmoid)."""
    dpo_loss_weights: list[float] | None = None
    """--dpo-loss-weights: one weight per --dpo-loss-type; the loss is the weighted sum (default all 1)."""
    dpo_beta: float | None = None
    """--dpo-beta: KL strength (temperature of the implicit reward) of --stage dpo and cpo; default 0.1."""
    dpo_label_smoothing: float = 0.0
    """--dpo-label-smoothing: label noise in [0, 0.5) of the sigmoid-family losses (cDPO, robust, exo_pair,
    sigmoid_norm, aot, aot_unpaired, simpo)."""
    discopop_tau: float | None = None
    """--discopop-tau: DiscoPOP's mixing temperature (--dpo-loss-type discopop); default 0.05."""
    reference_free: bool = False
    """--reference-free: --stage dpo losses against a uniform reference (log-probs 0); no reference model."""
    ld_alpha: float | None = None
    """--ld-alpha: LD-DPO: log-probs of the answer tokens past the pair's shorter answer are scaled by
    alpha in [0, 1], for policy and reference alike (--stage dpo, losses on summed log-probs)."""
    rpo_alpha: float | None = None
    """--rpo-alpha: RPO: weight of the chosen answers' NLL (token mean per pair) added to a --stage dpo loss."""
    pref_ftx: float = 0.0
    """--pref-ftx: the same NLL weight under LLaMA-Factory's name (exclusive with --rpo-alpha)."""
    simpo_beta: float | None = None
    """--simpo-beta: SimPO's reward scale (--stage simpo); default 2.0."""
    simpo_gamma: float | None = None
    """--simpo-gamma: SimPO's target reward margin, in reward units: loss -logsigmoid(beta * (mean logp_c -
    mean logp_r) - gamma) (--stage simpo, or cpo with --dpo-loss-type simpo); default 1.0."""
    cpo_alpha: float | None = None
    """--cpo-alpha: weight of the chosen answers' NLL (token mean per pair): --stage cpo (default 1.0) and
    simpo (default 0.0: pure SimPO)."""
    orpo_beta: float | None = None
    """--orpo-beta: ORPO's lambda, the weight of the odds-ratio term beside the NLL (--stage orpo); default 0.1."""
    ref_model: str | None = None
    """--ref-model: checkpoint directory of the reference policy (default: --load's)."""
    refer_model_iter: int | None = None
    """--refer-model-iter: iteration of the reference checkpoint used when resuming (default 1)."""
    precompute_ref_logps: bool = False
    """--precompute-ref-logps: one reference pass over the data, cached; training then holds no reference."""

    def __post_init__(self) -> None:
        _require(self.stage in STAGES, f"--stage {self.stage!r}: supported stages are: {', '.join(STAGES)}")
        stage, dpo = self.stage, self.stage == "dpo"
        if isinstance(self.dpo_loss_type, str):
            self.dpo_loss_type = [self.dpo_loss_type]
        self._only_for(stage in ("dpo", "cpo"), "dpo_loss_type", "dpo_beta")
        self._only_for(dpo, "dpo_loss_weights", "ld_alpha", "rpo_alpha")
        self._only_for(stage == "simpo", "simpo_beta")
        self._only_for(stage in ("simpo", "cpo"), "cpo_alpha")
        self._only_for(stage == "orpo", "orpo_beta")
        _require(dpo or not self.reference_free, f"--reference-free: --stage {stage} is reference-free already")
        _require(dpo or self.pref_ftx == 0, f"--pref-ftx does not apply to --stage {stage}"
                 + (" (use --cpo-alpha)" if stage in ("simpo", "cpo") else " (its NLL term is built in)"))

        if stage in ("dpo", "cpo"):
            self.dpo_loss_type = self.dpo_loss_type or ["sigmoid"]
            self.dpo_beta = 0.1 if self.dpo_beta is None else self.dpo_beta
            _require(self.dpo_beta > 0, "--dpo-beta must be > 0")
        allowed = DPO_LOSS_TYPES if dpo else CPO_LOSS_TYPES
        for name in self.dpo_loss_type or []:
            _require(name in allowed, f"--dpo-loss-type {name} does not apply to --stage {stage}: "
                                      f"choose from {', '.join(allowed)}")
        types = self.loss_types
        _require(len(set(types)) == len(types), "--dpo-loss-type names a loss twice")
        _require(dpo or len(types) == 1, f"--stage {stage} takes one --dpo-loss-type")
        if self.dpo_loss_weights is not None:
            _require(
                len(self.dpo_loss_weights) == len(types),
                f"--dpo-loss-weights has {len(self.dpo_loss_weights)} values for {len(types)} --dpo-loss-type "
                f"({' '.join(types)})",
            )
            _require(all(w > 0 for w in self.dpo_loss_weights), "--dpo-loss-weights must be > 0")

        if stage == "simpo":
            self.simpo_beta = 2.0 if self.simpo_beta is None else self.simpo_beta
            _require(self.simpo_beta > 0, "--simpo-beta must be > 0")
        _require(self.simpo_gamma is None or "simpo" in types,
                 f"--simpo-gamma applies to --stage simpo and to --stage cpo --dpo-loss-type simpo, "
                 f"not to --stage {stage}" + (f" --dpo-loss-type {' '.join(types)}" if stage == "cpo" else ""))
        if "simpo" in types:
            self.simpo_gamma = 1.0 if self.simpo_gamma is None else self.simpo_gamma
        if stage in ("simpo", "cpo"):
            self.cpo_alpha = (1.0 if stage == "cpo" else 0.0) if self.cpo_alpha is None else self.cpo_alpha
            _require(self.cpo_alpha >= 0, "--cpo-alpha must be >= 0")
        if stage == "orpo":
            self.orpo_beta = 0.1 if self.orpo_beta is None else self.orpo_beta
            _require(self.orpo_beta > 0, "--orpo-beta must be > 0")

        _require(0.0 <= self.dpo_label_smoothing < 0.5, "--dpo-label-smoothing must be in [0, 0.5)")
        smoothed = [name for name in LOSSES if LOSSES[name].label_smoothing]
        _require(
            self.dpo_label_smoothing == 0.0 or any(LOSSES[t].label_smoothing for t in types),
            f"--dpo-label-smoothing applies to the losses {', '.join(smoothed)}; "
            f"not to --stage {stage}" + (f" --dpo-loss-type {' '.join(types)}" if stage in ("dpo", "cpo") else ""),
        )
        _require(self.discopop_tau is None or "discopop" in types, "--discopop-tau needs --dpo-loss-type discopop")
        if "discopop" in types:
            self.discopop_tau = 0.05 if self.discopop_tau is None else self.discopop_tau
            _require(self.discopop_tau > 0, "--discopop-tau must be > 0")
        if self.ld_alpha is not None:
            _require(0.0 <= self.ld_alpha <= 1.0, "--ld-alpha must be in [0, 1]")
            averaged = [t for t in types if LOSSES[t].average_logps]
            _require(not averaged, f"--ld-alpha desensitizes summed log-probs; --dpo-loss-type {' '.join(averaged)} "
                                   "already normalizes by length")
        _require(self.rpo_alpha is None or self.rpo_alpha >= 0, "--rpo-alpha must be >= 0")
        _require(self.pref_ftx >= 0, "--pref-ftx must be >= 0")
        _require(self.rpo_alpha is None or self.pref_ftx == 0,
                 "--rpo-alpha and --pref-ftx both weight the chosen NLL: set one")

        if not self.uses_reference:
            why = "--reference-free" if dpo else f"--stage {stage}"
            for name in ("ref_model", "refer_model_iter"):
                _require(getattr(self, name) is None,
                         f"--{name.replace('_', '-')} does not apply: {why} builds no reference model")
            _require(not self.precompute_ref_logps,
                     f"--precompute-ref-logps does not apply: {why} builds no reference model")
        elif self.refer_model_iter is None:
            self.refer_model_iter = 1
        _require(self.refer_model_iter is None or self.refer_model_iter >= 1, "--refer-model-iter must be >= 1")

    def _only_for(self, applies: bool, *names: str) -> None:
        for name in names:
            _require(applies or getattr(self, name) is None,
                     f"--{name.replace('_', '-')} does not apply to --stage {self.stage}")

    @property
    def uses_reference(self) -> bool:
        """False for reference-free objectives: no reference model is built or run."""
        return self.stage == "dpo" and not self.reference_free

    @property
    def loss_types(self) -> list[str]:
        return [self.stage] if self.stage in ("simpo", "orpo") else list(self.dpo_loss_type or [])

    @property
    def loss_terms(self) -> list[tuple[float, str]]:
        """(weight, loss name) of each term of the preference loss."""
        types = self.loss_types
        return list(zip(self.dpo_loss_weights or [1.0] * len(types), types))

    @property
    def beta(self) -> float:
        """The beta of the stage (--orpo-beta is ORPO's lambda)."""
        return {"dpo": self.dpo_beta, "cpo": self.dpo_beta, "simpo": self.simpo_beta, "orpo": self.orpo_beta}[self.stage]

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' NLL (token mean per pair) added to the preference loss."""
        if self.stage == "orpo":
            return 1.0
        if self.stage in ("simpo", "cpo"):
            return self.cpo_alpha
        return self.rpo_alpha if self.rpo_alpha is not None else self.pref_ftx

    def describe(self) -> str:
        """The objective and every hyper-parameter in effect, for the startup log."""
        types = self.loss_types
        terms = [t if (w, len(types)) == (1.0, 1) else f"{w:g}*{t}" for w, t in self.loss_terms]
        if self.nll_weight > 0:
            terms.append(f"{self.nll_weight:g}*nll")
        beta_flag = {"dpo": "--dpo-beta", "cpo": "--dpo-beta", "simpo": "--simpo-beta", "orpo": "--orpo-beta"}
        params = [f"{beta_flag[self.stage]} {self.beta:g}"]
        if any(LOSSES[t].label_smoothing for t in types):
            params.append(f"--dpo-label-smoothing {self.dpo_label_smoothing:g}")
        if "simpo" in types:
            params.append(f"--simpo-gamma {self.simpo_gamma:g}")
        if "discopop" in types:
            params.append(f"--discopop-tau {self.discopop_tau:g}")
        if self.ld_alpha is not None:
            params.append(f"--ld-alpha {self.ld_alpha:g}")
        if "bco_pair" in types:
            params.append("bco delta: running mean reward")
        averaged = [t for t in types if LOSSES[t].average_logps]
        if averaged:
            params.append(f"token-averaged log-probs for {' '.join(averaged)}")
        params.append("reference model" if self.uses_reference else "reference-free")
        return f"{self.stage}: loss = {' + '.join(terms)} | {', '.join(params)}"


@dataclass
class LoggingConfig:
    """Console, JSONL and TensorBoard metrics."""

    log_interval: int = 1
    """--log-interval: iterations between metric lines."""
    tensorboard_dir: str | None = None
    """--tensorboard-dir."""
    peak_tflops: float | None = None
    """--peak-tflops: per-device peak for MFU; default a table of known GPUs, none on CPU."""
    validate_only: bool = False
    """--validate-only: check the flags against the layout and stop (launch-script dry run)."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "--log-interval must be >= 1")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "--peak-tflops must be > 0")


@dataclass
class LoraConfig:
    """LoRA adapters on the decoder's linears (MindSpeed-LLM flag names); off unless --lora-r is set."""

    lora_r: int | None = None
    """--lora-r: adapter rank; setting it turns LoRA on (base weights frozen, only adapters trained)."""
    lora_alpha: float = 32.0
    """--lora-alpha: the adapter output is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """--lora-dropout: dropout on the adapter branch's input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1",
                                                                    "linear_fc2"])
    """--lora-target-modules: megatron-core linears to adapt (linear_qkv linear_proj linear_fc1 linear_fc2)."""
    lora_load: str | None = None
    """--lora-load: checkpoint directory whose adapters (and training state, if any) resume on --load's base."""
    lora_ckpt_filter: bool = False
    """--lora-ckpt-filter: checkpoints hold the adapter tensors only (plus optimizer and training state)."""

    def __post_init__(self) -> None:
        targets = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
        _require(self.lora_r is None or self.lora_r > 0, "--lora-r must be > 0")
        _require(self.lora_alpha > 0, "--lora-alpha must be > 0")
        _require(0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)")
        unknown = sorted(set(self.lora_target_modules) - set(targets))
        _require(not unknown, f"--lora-target-modules {' '.join(unknown)}: choose from {' '.join(targets)}")
        _require(bool(self.lora_target_modules), "--lora-target-modules needs at least one module")
        _require(self.lora_load is None or self.enabled, "--lora-load needs --lora-r (and --lora-alpha)")
        _require(not self.lora_ckpt_filter or self.enabled, "--lora-ckpt-filter needs --lora-r")

    @property
    def enabled(self) -> bool:
        return self.lora_r is not None


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


def validate(config: EngineConfig, world_size: int) -> None:
    """Rules that span sections; raises ConfigError naming the flags before any work is done."""
    model, par, train = config.model, config.parallel, config.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
        f"--pipeline-model-parallel-size ({pp})",
    )
    dp = world_size // (tp * pp)
    _require(
        model.num_attention_heads % tp == 0,
        f"--num-attention-heads ({model.num_attention_heads}) must be divisible by "
        f"--tensor-model-parallel-size ({tp})",
    )
    _require(
        model.num_query_groups % tp == 0,
        f"--num-query-groups ({model.num_query_groups}) must be divisible by --tensor-model-parallel-size ({tp})",
    )
    _require(
        model.ffn_hidden_size % tp == 0,
        f"--ffn-hidden-size ({model.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})",
    )
    if par.num_layer_list is None:
        _require(
            model.num_layers % pp == 0,
            f"--num-layers ({model.num_layers}) must be divisible by --pipeline-model-parallel-size ({pp}); "
            "pass --num-layer-list for an uneven split",
        )
    else:
        _require(
            sum(par.num_layer_list) == model.num_layers,
            f"--num-layer-list {','.join(map(str, par.num_layer_list))} sums to {sum(par.num_layer_list)}, "
            f"not --num-layers ({model.num_layers})",
        )
    if par.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = model.num_layers // pp
        _require(
            per_stage % par.num_layers_per_virtual_pipeline_stage == 0,
            f"layers per pipeline stage ({per_stage} = --num-layers / --pipeline-model-parallel-size) must be "
            f"divisible by --num-layers-per-virtual-pipeline-stage ({par.num_layers_per_virtual_pipeline_stage})",
        )
    if model.padded_vocab_size is not None:
        _require(
            model.padded_vocab_size % tp == 0,
            f"--padded-vocab-size ({model.padded_vocab_size}) must be divisible by --tensor-model-parallel-size ({tp})",
        )
        _require(
            model.vocab_size is None or model.padded_vocab_size >= model.vocab_size,
            f"--padded-vocab-size ({model.padded_vocab_size}) is smaller than --vocab-size ({model.vocab_size})",
        )
    _require(
        not (config.lora.enabled and config.preference.ref_model),
        "--ref-model cannot be combined with --lora-r: the LoRA reference is the base model with adapters off",
    )
    if train.global_batch_size is None:
        train.global_batch_size = train.micro_batch_size * dp
    _require(
        train.global_batch_size % (train.micro_batch_size * dp) == 0,
        f"--global-batch-size ({train.global_batch_size}) must be divisible by --micro-batch-size "
        f"({train.micro_batch_size}) x data-parallel size ({dp} = world {world_size} / (TP {tp} x PP {pp}))",
    )
    if par.num_layers_per_virtual_pipeline_stage is not None:
        microbatches = train.global_batch_size // (train.micro_batch_size * dp)
        _require(
            microbatches % pp == 0,
            f"the interleaved schedule needs the number of micro-batches ({microbatches}) to be a multiple of "
            f"--pipeline-model-parallel-size ({pp}); adjust --global-batch-size",
        )
    for name in SORTED_LOSS_TYPES:
        _require(
            name not in config.preference.loss_types or train.micro_batch_size >= 2,
            f"--dpo-loss-type {name} sorts log-ratios over the pairs of a micro-batch; with --micro-batch-size 1 "
            "it is the sigmoid loss: use --micro-batch-size >= 2",
        )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--position-embedding-type", default="rope", choices=["rope", "learned_absolute"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rope-scaling-type", choices=["llama3"])
    g.add_argument("--use-rope-scaling", dest="rope_scaling_type", action="store_const", const="llama3",
                   help="Megatron-LM spelling of --rope-scaling-type llama3")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0)
    g.add_argument("--low-freq-factor", type=float, default=1.0)
    g.add_argument("--high-freq-factor", type=float, default=4.0)
    g.add_argument("--original-max-position-embeddings", type=int, default=8192)
    g.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm", "LayerNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--padded-vocab-size", type=int)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "transformer_engine", "local"])
    g.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "unfused"])


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for comma-separated counts such as --num-layer-list 3,5 (training and convert_ckpt.py)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 3,5, got {text!r}") from None


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallel")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--num-layer-list", type=int_list, metavar="N1,N2,...")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int)


def _add_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--override-opt-param-scheduler", "--override-opt_param-scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler",
                   action="store_true")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--max-skipped-iters", type=int, default=10)
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true")
    g.add_argument("--exit-signal-handler", action="store_true")
    g.add_argument("--exit-interval", type=int)
    g.add_argument("--exit-duration-in-mins", type=float)


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint")
    g.add_argument("--load")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-verify-checkpoint", action="store_true")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--peak-tflops", type=float)
    g.add_argument("--validate-only", action="store_true",
                   help="parse and validate the flags for WORLD_SIZE ranks, print the configuration, exit")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--is-pairwise-dataset", action="store_true")
    g.add_argument("--pack-sequences", action="store_true")


def _add_preference_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("preference optimization")
    g.add_argument("--stage", default="dpo", choices=list(STAGES),
                   help="dpo (against a reference policy); simpo, orpo, cpo are reference-free")
    g.add_argument("--dpo-loss-type", nargs="+", metavar="LOSS",
                   help="one or more of: " + ", ".join(DPO_LOSS_TYPES) + " (--stage dpo, default sigmoid); "
                        "one of: " + ", ".join(CPO_LOSS_TYPES) + " (--stage cpo)")
    g.add_argument("--dpo-loss-weights", type=float, nargs="+", metavar="W",
                   help="one weight per --dpo-loss-type: the loss is the weighted sum")
    g.add_argument("--dpo-beta", type=float, help="default 0.1 (--stage dpo and cpo)")
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0)
    g.add_argument("--discopop-tau", type=float, help="default 0.05 (--dpo-loss-type discopop)")
    g.add_argument("--reference-free", action="store_true", help="--stage dpo without a reference model")
    g.add_argument("--ld-alpha", type=float, help="LD-DPO length desensitization in [0, 1]")
    g.add_argument("--rpo-alpha", type=float, help="weight of the chosen NLL added to a dpo loss (RPO)")
    g.add_argument("--pref-ftx", type=float, default=0.0)
    g.add_argument("--simpo-beta", type=float, help="default 2.0 (--stage simpo)")
    g.add_argument("--simpo-gamma", type=float, help="target reward margin, default 1.0")
    g.add_argument("--cpo-alpha", type=float, help="chosen NLL weight: default 1.0 (cpo), 0.0 (simpo)")
    g.add_argument("--orpo-beta", type=float, help="ORPO's lambda, default 0.1 (--stage orpo)")
    g.add_argument("--ref-model")
    g.add_argument("--refer-model-iter", type=int, help="default 1")
    g.add_argument("--precompute-ref-logps", action="store_true")


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("lora")
    g.add_argument("--lora-r", type=int)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-target-modules", nargs="+", default=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    g.add_argument("--lora-load")
    g.add_argument("--lora-ckpt-filter", action="store_true")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The engine's parser; unknown flags are an error (argparse's default), never ignored."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    for add in (_add_model_args, _add_parallel_args, _add_precision_args, _add_training_args,
                _add_checkpoint_args, _add_logging_args, _add_data_args, _add_preference_args, _add_lora_args,
                add_tokenizer_args):
        add(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    tokenizer = None
    if args.tokenizer_type or args.tokenizer_name_or_path or args.tokenizer_model:
        try:
            tokenizer = TokenizerConfig.from_args(args)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if args.vocab_size is None and args.padded_vocab_size is None:
            args.vocab_size = build_tokenizer(tokenizer).vocab_size
    return EngineConfig(
        model=_from_namespace(ModelConfig, args),
        parallel=_from_namespace(ParallelConfig, args),
        precision=_from_namespace(PrecisionConfig, args),
        training=_from_namespace(TrainingConfig, args),
        checkpoint=_from_namespace(CheckpointConfig, args),
        logging=_from_namespace(LoggingConfig, args),
        data=_from_namespace(DataConfig, args),
        preference=_from_namespace(PreferenceConfig, args),
        lora=_from_namespace(LoraConfig, args),
        tokenizer=tokenizer,
    )


def plain_config(config: EngineConfig) -> dict:
    """Every section as plain Python values: printable, JSON-able, torch.load-safe."""
    return {f.name: asdict(getattr(config, f.name)) for f in fields(config) if getattr(config, f.name) is not None}


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None) -> EngineConfig:
    """Parse, build the config sections and validate them against the world size.

    A ConfigError becomes an argparse error (usage line + message, exit code 2).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = config_from_args(args)
        validate(config, world_size)
    except ConfigError as err:
        parser.error(str(err))
    return config
