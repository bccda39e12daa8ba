"""Saving and loading training state in the Megatron-LM layout (see engine/checkpoint/layout.py).

Each (TP, PP) rank's file is written by its data-parallel rank 0 and holds the model
chunk(s), the optimizer (its non-sharded part; the distributed optimizer's sharded
state goes to `distrib_optim.pt` beside it, gathered over DP as Megatron-LM does),
the scheduler, the RNG states of every DP rank, the iteration, the consumed samples
and the run's arguments. Publishing is atomic and done by global rank 0 after every
rank has written.

Each rank reads and writes its own files, so a bad file fails on one rank only: every such step
ends in an exchange of errors (`_on_every_rank`), and all ranks stop with the first failing rank's
message instead of the others waiting in the next collective.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from engine.arguments import EngineConfig, moe_layer_pattern, plain_config
from engine.checkpoint.layout import (
    CHECKPOINT_VERSION,
    TRACKER_FILE,
    CheckpointError,
    discover_parallel_layout,
    incomplete_checkpoints,
    iteration_dir_name,
    load_rank_state,
    publish,
    rank_file,
    read_tracker,
    staging_dir,
    verify_files,
    write_failure,
    write_rank_state,
)
from engine.checkpoint.manifest import record_digest
from engine.checkpoint.sharding import ShardLayout, merge_state_dicts, select_experts, shard_state_dict
from engine.formats import VALUE_HEAD_KEY
from engine.model.lora import is_adapter_key, trained_with_adapters
from engine.model.provider import unwrap_model
from engine.model.spelling import match_spelling
from engine.platform import accelerator_rng_state, set_accelerator_rng_state
from engine.training.optimizer import restore_scheduler

logger = logging.getLogger(__name__)

DISTRIBUTED_OPTIMIZER_FILE = "distrib_optim.pt"
# Model fields a checkpoint must agree on with the run's flags (shape-defining or numerics-defining); the padded
# vocab is compared too. Not compared: dropout and init (training choices), --seq-length, the implementation flags.
CHECKED_MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "norm_epsilon", "swiglu", "disable_bias_linear", "add_qkv_bias", "qk_layernorm",
    "untie_embeddings_and_output_weights", "vocab_size", "position_embedding_type", "rotary_base",
    "rope_scaling_type",
)
CHECKED_MOE_FIELDS = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax",
                      "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")
"""The MoE architecture a checkpoint must share with the flags (a dense checkpoint records none of them)."""
ROPE_SCALING_FIELDS = ("rope_scaling_factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""Compared when the run scales RoPE (--rope-scaling-type llama3); unread otherwise."""


@dataclass
class TrainState:
    """Where a run stands: the next iteration is `iteration + 1`."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    """Updates skipped for a non-finite loss or gradient norm, over the whole run."""


def _rank_coordinates() -> tuple[int, int, int]:
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def _expert_coordinates(config: EngineConfig) -> tuple[int, int]:
    """(EP rank, EP size): the expert part of this rank's file name (Megatron-LM's mp_rank_TT[_PPP]_EEE)."""
    ep = config.parallel.expert_model_parallel_size
    return (parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0), ep


def _writes_files(config: EngineConfig) -> bool:
    """Whether this rank writes its (TP, PP, EP) file: the lowest global rank of those that share it.

    With ETP == TP (and without experts) that is data-parallel rank 0 of the experts' data-parallel group, the
    rank Megatron-LM writes it from. With ETP below TP Megatron-LM's writers (expert-DP rank 0) miss the files
    of some layouts (TP2 x ETP1 x EP1: mp_rank_01); the lowest rank of each file writes them all, and the
    same ones as Megatron-LM where it writes every file. Collective.
    """
    tp_rank, pp_rank, _ = _rank_coordinates()
    mine = (tp_rank, pp_rank, _expert_coordinates(config)[0])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone.index(mine) == dist.get_rank()


def _model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _rng_state() -> dict:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    accelerator = accelerator_rng_state()
    if accelerator is not None:
        state["cuda_rng_state"] = accelerator
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state:
        set_accelerator_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _on_every_rank(action: Callable | None):
    """Runs `action()`, a step on this rank's own files (None: nothing to do here), then exchanges errors: a
    CheckpointError on any rank is raised on every rank with the first failing rank's message (prefixed
    `rank N:` unless N is 0), so that rank 0 reports it and no rank waits in a collective for one that stopped."""
    try:
        result, error = action() if action is not None else None, None
    except CheckpointError as err:
        result, error = None, str(err)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    rank, message = next(((r, e) for r, e in enumerate(errors) if e is not None), (None, None))
    if message is not None:
        raise CheckpointError(message if rank == 0 else f"rank {rank}: {message}")
    return result


def load_model_weights(chunks: list[torch.nn.Module], root: str, iteration: int, config: EngineConfig) -> dict:
    """Loads iteration `iteration` of `root` into this rank's chunks; returns the rank file's contents."""
    return _on_every_rank(partial(_load_model_weights, chunks, root, iteration, config))


def _load_model_weights(chunks: list[torch.nn.Module], root: str, iteration: int, config: EngineConfig) -> dict:
    state, path = _checked_rank_state(root, iteration, config)
    args = state.get("args") or {}
    if args.get("lora_adapter_only"):
        raise CheckpointError(
            f"{root} is an adapter-only LoRA checkpoint (saved with --lora-ckpt-filter) and holds no base weights: "
            f"pass --load {args.get('lora_base') or 'BASE'} --lora-load {root} with the run's --lora-r"
        )
    # A reward model starts from a language model's weights (its vocab projection dropped, the value head
    # keeping its seeded init) unless the checkpoint records where its head came from.
    value_head = config.preference.traits.value_head
    fresh_head = value_head and not args.get("value_head_init")
    keys = _model_keys(len(chunks))
    if all(key in state for key in keys):
        chunk_states = [state[key] for key in keys]
    elif "model" in state and len(chunks) > 1:
        chunk_states = _interleave_stages(root, iteration, config)
    else:
        raise CheckpointError(
            f"{path} holds {sorted(k for k in state if k.startswith('model'))}, the run needs {keys}: it was saved "
            "with another --num-layers-per-virtual-pipeline-stage; reshard it with tools/checkpoint/convert_ckpt.py"
        )
    for chunk_state, chunk in zip(chunk_states, chunks):
        model = unwrap_model(chunk)
        # A checkpoint written for the other layer spec (local norms or TE's fused ones) loads as well.
        chunk_state = match_spelling(chunk_state, model.state_dict().keys())
        if value_head:
            chunk_state = {k: v for k, v in chunk_state.items() if k != "output_layer.weight"}
        try:
            result = model.load_state_dict(chunk_state, strict=False)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: weights do not fit the model built from the flags: {err}") from None
        # Adapters absent from a base checkpoint keep their fresh init (LoRA's --load).
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and not is_adapter_key(k)
                   and not (fresh_head and k == VALUE_HEAD_KEY)]
        if missing or result.unexpected_keys:
            hint = (" (a reward model checkpoint: train it with --stage rm)"
                    if VALUE_HEAD_KEY in result.unexpected_keys else "")
            raise CheckpointError(
                f"{path}: missing weights {missing[:5]}, unexpected weights {result.unexpected_keys[:5]}{hint}"
            )
    return state


def _checked_rank_state(root: str, iteration: int, config: EngineConfig) -> tuple[dict, Path]:
    """This rank's file of `iteration` under `root` (checked against its checksum) and its path, once the
    checkpoint's TP/PP layout, recorded architecture and stage split are known to match the run's flags."""
    saved_ep = check_parallel_layout(root, iteration, config)
    tp_rank, pp_rank, pp_size = _rank_coordinates()
    ep_rank, run_ep = _expert_coordinates(config)
    ep_rank = ep_rank if saved_ep > 1 else 0
    path = rank_file(Path(root) / iteration_dir_name(iteration), tp_rank, pp_rank, pp_size, ep_rank, saved_ep)
    if not path.is_file():  # its TP/PP/EP are the run's (checked above): only a smaller ETP leaves files out
        raise CheckpointError(
            f"{path} does not exist: the checkpoint was saved with an --expert-tensor-parallel-size below the run's "
            f"{config.parallel.expert_tensor_size}, which has no file for TP rank {tp_rank} and EP rank {ep_rank}: "
            "run with the checkpoint's, or reshard it with tools/checkpoint/convert_ckpt.py --load-model-type mg "
            f"--save-model-type mg --target-expert-tensor-parallel-size {config.parallel.expert_tensor_size}")
    state = load_rank_state(root, iteration, tp_rank, pp_rank, pp_size,
                            verify=not config.checkpoint.no_verify_checkpoint, ep_rank=ep_rank, ep_size=saved_ep)
    check_model_args(state.get("args"), config, path)
    check_expert_split(state.get("args"), config, path)
    check_stage_split(state.get("args"), config, path)
    if saved_ep != run_ep:
        _select_run_experts(state, config, path)
    return state, path


def latest_iteration(root: str, flag: str) -> int:
    """The tracker's iteration of `root` (given as `flag`); without a tracker, the error lists the saved
    iterations and how to choose one."""
    latest = read_tracker(root)
    if latest is not None:
        return latest
    saved = sorted(p.name for p in Path(root).glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    if not saved:
        raise CheckpointError(f"{flag} {root}: no {TRACKER_FILE} there")
    raise CheckpointError(
        f"{flag} {root}: no {TRACKER_FILE} there, but it holds {', '.join(saved)}: to load one, write its iteration "
        f"into the tracker, e.g. echo {int(saved[-1][5:])} > {Path(root) / TRACKER_FILE}"
    )


def _select_run_experts(state: dict, config: EngineConfig, path: Path) -> None:
    """A file saved without expert parallelism (all experts), loaded by an EP run: each EP rank keeps its
    experts. Weights only: a resume needs the optimizer state of the run's own layout."""
    resuming = "opt_param_scheduler" in state and not (config.checkpoint.finetune or config.checkpoint.no_load_optim)
    run_ep = config.parallel.expert_model_parallel_size
    if resuming:
        raise CheckpointError(
            f"{path} was saved without expert parallelism, the run uses --expert-model-parallel-size {run_ep}: a "
            "resume needs its own layout's optimizer state; pass --finetune (weights only) or reshard it with "
            f"tools/checkpoint/convert_ckpt.py --target-expert-parallel-size {run_ep}"
        )
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    for key in [k for k in state if k == "model" or (k.startswith("model") and k[5:].isdigit())]:
        state[key] = select_experts(state[key], config.moe.num_experts, run_ep, ep_rank)


def _interleave_stages(root: str, iteration: int, config: EngineConfig) -> list[dict]:
    """This rank's virtual-stage chunks, cut from a checkpoint saved without virtual stages.

    Interleaved chunks take layers from other pipeline stages' files, so this reads every
    stage file of this TP rank once (a start-up cost, paid only in this case).
    """
    tp_rank, pp_rank, pp_size = _rank_coordinates()
    ep_rank, ep = _expert_coordinates(config)
    # TP and EP size 1 in these layouts: each tensor is already this rank's slice (its experts) and stays whole.
    target = replace(run_layout(config), tensor_model_parallel_size=1, padded_vocab_size=None,
                     expert_model_parallel_size=1)
    saved = replace(target, virtual_pipeline_size=None)
    verify = not config.checkpoint.no_verify_checkpoint
    per_stage = {(0, stage, None): load_rank_state(root, iteration, tp_rank, stage, pp_size, verify, ep_rank,
                                                   ep)["model"]
                 for stage in range(pp_size)}
    full = merge_state_dicts(per_stage, saved)
    return [shard_state_dict(full, target, 0, pp_rank, v) for v in range(config.virtual_pipeline_size)]


def run_layout(config: EngineConfig) -> ShardLayout:
    """How this run splits the model, in the terms the converters use for checkpoints."""
    return ShardLayout(
        num_layers=config.model.num_layers,
        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.parallel.pipeline_model_parallel_size,
        virtual_pipeline_size=config.virtual_pipeline_size,
        layers_per_stage=config.parallel.num_layer_list,
        swiglu=config.model.swiglu,
        tied_embeddings=not config.model.untie_embeddings_and_output_weights,
        padded_vocab_size=config.padded_vocab_size,
        expert_model_parallel_size=config.parallel.expert_model_parallel_size,
        num_experts=config.moe.num_experts,
        expert_tensor_parallel_size=config.parallel.expert_tensor_size if config.moe.enabled else None,
    )


def check_parallel_layout(root: str, iteration: int, config: EngineConfig) -> int:
    """Weights are not resharded on load: the checkpoint's TP and PP (its mp_rank_* folders) must be the run's.
    (A TP1 run finds TP2's mp_rank_00 and would fail on every tensor's size.) Its EP is the run's, or 1 (each
    EP rank then takes its experts from the files); returns it."""
    run_tp = config.parallel.tensor_model_parallel_size
    run_pp = config.parallel.pipeline_model_parallel_size
    run_ep = config.parallel.expert_model_parallel_size
    tp, pp, ep = discover_parallel_layout(root, iteration, expert_parallel=run_ep > 1 and run_pp == 1)
    if ep not in (1, run_ep):
        raise CheckpointError(
            f"{Path(root) / iteration_dir_name(iteration)} was saved with EP{ep}, the run uses EP{run_ep}: run with "
            f"--expert-model-parallel-size {ep}, or reshard it with tools/checkpoint/convert_ckpt.py --load-model-type "
            f"mg --save-model-type mg --load-dir {root} --save-dir NEW_DIR --target-expert-parallel-size {run_ep}"
        )
    if (tp, pp) != (run_tp, run_pp):
        raise CheckpointError(
            f"{Path(root) / iteration_dir_name(iteration)} was saved with TP{tp} PP{pp}, the run uses TP{run_tp} "
            f"PP{run_pp}: run with --tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}, or convert "
            f"it with tools/checkpoint/convert_ckpt.py --load-model-type mg --save-model-type mg --load-dir {root} "
            f"--save-dir NEW_DIR --target-tensor-parallel-size {run_tp} --target-pipeline-parallel-size {run_pp}"
        )
    return ep


def check_model_args(saved: dict | None, config: EngineConfig, path: Path) -> None:
    """The architecture recorded in the checkpoint must match the flags, or the error says which flag differs."""
    if not saved:
        return
    model = config.model
    names = list(CHECKED_MODEL_FIELDS)
    if model.rope_scaling_type is not None:
        names += ROPE_SCALING_FIELDS
    if model.position_embedding_type == "learned_absolute":
        names.append("max_position_embeddings")  # the position table's rows; rope has no table
    flags = {**{name: getattr(model, name) for name in names},
             **{name: getattr(config.moe, name) for name in CHECKED_MOE_FIELDS}}
    if config.moe.enabled:
        flags["moe_ffn_hidden_size"] = config.moe.expert_ffn(model)
        # Recorded as the pattern (integer or list); a checkpoint from before the flag made every layer MoE.
        if "num_experts" in saved and saved.get("num_layers") == model.num_layers:
            flags["moe_layer_freq"] = config.moe.layer_pattern(model.num_layers)
            saved = {**saved, "moe_layer_freq": moe_layer_pattern(saved.get("moe_layer_freq", 1), model.num_layers)}
    mismatches = [
        f"--{name.replace('_', '-')}: checkpoint {saved.get(name)!r}, flags {value!r}"
        for name, value in flags.items()
        # recorded (None included) and different; a dense checkpoint records no MoE field, an MoE run needs them
        if (name in saved and saved[name] != value) or (name == "num_experts" and name not in saved and value)
    ]
    padded = _saved_padded_vocab(saved)
    if padded is not None and padded != config.padded_vocab_size:
        mismatches.append(f"--make-vocab-size-divisible-by / --padded-vocab-size: checkpoint's padded vocab {padded}, "
                          f"flags' {config.padded_vocab_size}")
    if mismatches:
        raise CheckpointError(f"{path} was saved for a different model: " + "; ".join(mismatches))


def _saved_padded_vocab(saved: dict) -> int | None:
    """Embedding rows of a checkpoint: training records them as padded_vocab_size; the converter records the
    explicit --padded-vocab-size or else the rounding rule's inputs (ModelConfig.padded_vocab)."""
    if saved.get("padded_vocab_size") is not None:
        return saved["padded_vocab_size"]
    rule = [saved.get(k) for k in ("vocab_size", "make_vocab_size_divisible_by", "tensor_model_parallel_size")]
    if None in rule:
        return None
    vocab, divisor, tp = rule
    return -(-vocab // (divisor * tp)) * (divisor * tp)


def check_expert_split(saved: dict | None, config: EngineConfig, path: Path) -> None:
    """The experts' tensor-parallel split (ETP) of an MoE checkpoint must be the run's: each file holds one
    expert-TP slice. A checkpoint that records none (older ones) split its experts over TP."""
    if not saved or not config.moe.enabled or "tensor_model_parallel_size" not in saved:
        return
    etp = saved.get("expert_tensor_parallel_size") or saved["tensor_model_parallel_size"]
    run = config.parallel.expert_tensor_size
    if etp != run:
        raise CheckpointError(
            f"{path} splits each expert over --expert-tensor-parallel-size {etp}, the run over {run}: run with "
            f"--expert-tensor-parallel-size {etp}, or reshard it with tools/checkpoint/convert_ckpt.py "
            f"--load-model-type mg --save-model-type mg --target-expert-tensor-parallel-size {run}"
        )


def check_stage_split(saved: dict | None, config: EngineConfig, path: Path) -> None:
    """Same pipeline size, different layers per stage (--num-layer-list): say so before loading fails."""
    pp = config.parallel.pipeline_model_parallel_size
    if saved and saved.get("pipeline_model_parallel_size", pp) != pp:
        # Megatron-LM's mp_rank_TT_NNN names a pipeline rank or an expert rank: the recorded layout decides.
        raise CheckpointError(f"{path} was saved with --pipeline-model-parallel-size "
                              f"{saved['pipeline_model_parallel_size']}, the run uses {pp}")
    if not saved:
        return
    num_layers = config.model.num_layers
    even = [num_layers // pp] * pp
    theirs, ours = saved.get("num_layer_list") or even, list(config.parallel.num_layer_list or even)
    if list(theirs) != ours:
        raise CheckpointError(
            f"{path} splits the layers over pipeline stages as {','.join(map(str, theirs))}, the run as "
            f"{','.join(map(str, ours))}: pass --num-layer-list {','.join(map(str, theirs))}, or reshard the "
            "checkpoint with tools/checkpoint/convert_ckpt.py --num-layer-list"
        )


def _save_optimizer_shards(optimizer, file: Path, writes: bool) -> None:
    """The distributed optimizer's state: gathered over DP and written by DP rank 0 (megatron-core), whose
    checksum is then read back once, by the rank that wrote the model file beside it. Under ETP below TP a
    file some rank reads it from is written by dense or expert DP rank 0, each of which writes its model file;
    other files may have none (no rank reads one there)."""
    try:
        optimizer.save_parameter_state(str(file))
        if writes and file.is_file():
            record_digest(file)
    except (OSError, RuntimeError) as err:
        file.unlink(missing_ok=True)
        raise CheckpointError(write_failure(file, err, None)) from None


class Checkpointer:
    """Saves and restores the policy's training state."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.checkpoint = config.checkpoint
        self.inherited_args: dict = {}
        """Provenance from the loaded checkpoint (family, tokenizer, HF config) that mg -> hf needs."""
        self.state_root: str | None = config.checkpoint.load
        """Where the training state comes from: --load, or --lora-load under LoRA."""

    def interval_due(self, iteration: int) -> bool:
        """--save-interval divides `iteration`: the loop saves it (and the end of the run need not again)."""
        interval = self.checkpoint.save_interval
        return bool(interval and iteration % interval == 0)

    def saved_args(self) -> dict:
        """Flat model fields and layout, as the converters read them, plus the whole run config."""
        prec = self.config.precision
        return {
            **self.inherited_args,
            **asdict(self.config.model),
            "tensor_model_parallel_size": self.config.parallel.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.config.parallel.pipeline_model_parallel_size,
            "expert_model_parallel_size": self.config.parallel.expert_model_parallel_size,
            "expert_tensor_parallel_size": (self.config.parallel.expert_tensor_size if self.config.moe.enabled
                                            else None),
            **self._moe_args(),
            "num_layer_list": list(self.config.parallel.num_layer_list) if self.config.parallel.num_layer_list else None,
            "padded_vocab_size": self.config.padded_vocab_size,
            "params_dtype": "bf16" if prec.bf16 else "fp16" if prec.fp16 else "fp32",
            "engine": plain_config(self.config),
            **self._lora_args(),
        }

    def save(self, iteration: int, model: list, optimizer, scheduler, state: TrainState,
             extra: dict | None = None) -> Path | None:
        """Collective over all ranks; `extra` entries are stored in every rank file."""
        root = self.checkpoint.save
        if root is None:
            return None
        tp_rank, pp_rank, pp_size = _rank_coordinates()
        dp_group = parallel_state.get_data_parallel_group()
        if dist.get_rank() == 0:  # the save lock makes every leftover one of an interrupted save
            for leftover in incomplete_checkpoints(root):
                shutil.rmtree(leftover, ignore_errors=True)
        dist.barrier()
        rng_states = [None] * dist.get_world_size(dp_group)
        dist.all_gather_object(rng_states, _rng_state(), group=dp_group)
        rank_state = {
            "iteration": iteration,
            "checkpoint_version": CHECKPOINT_VERSION,
            "args": self.saved_args(),
            "optimizer": optimizer.state_dict(),
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": rng_states,
            "train_state": asdict(state),
            **(extra or {}),
        }
        for key, chunk in zip(_model_keys(len(model)), model):
            weights = unwrap_model(chunk).state_dict()
            if self.config.lora.lora_ckpt_filter:
                weights = {k: v for k, v in weights.items() if trained_with_adapters(k)}
            rank_state[key] = weights
        ep_rank, ep = _expert_coordinates(self.config)
        path = rank_file(staging_dir(root, iteration), tp_rank, pp_rank, pp_size, ep_rank, ep)
        writes = _writes_files(self.config)
        _on_every_rank(partial(write_rank_state, root, iteration, tp_rank, pp_rank, pp_size, rank_state, ep_rank, ep)
                       if writes else None)
        if self.config.parallel.use_distributed_optimizer:
            _on_every_rank(partial(_save_optimizer_shards, optimizer, path.parent / DISTRIBUTED_OPTIMIZER_FILE,
                                   writes))
        _on_every_rank(partial(publish, root, iteration) if dist.get_rank() == 0 else None)
        final = Path(root) / iteration_dir_name(iteration)
        logger.info("saved checkpoint %s", final)
        return final

    def load_policy(self, model: list) -> tuple[int, dict]:
        """Loads the policy weights from the latest iteration of --load; returns (iteration, rank file).

        A rank file written by training (it has scheduler state) means a resume unless --finetune;
        a converted checkpoint (iteration 1, weights only) starts a fresh run.
        """
        root = self.checkpoint.load
        for leftover in incomplete_checkpoints(root):
            logger.warning("ignoring %s: a save that was interrupted before it was published", leftover)
        latest = latest_iteration(root, "--load")
        state = load_model_weights(model, root, latest, self.config)
        args = state.get("args") or {}
        self.inherited_args = {k: args[k] for k in ("family", "tokenizer", "hf_config", "value_head_init")
                               if k in args}
        if self.config.preference.traits.value_head and "value_head_init" not in args:
            training = self.config.training
            self.inherited_args["value_head_init"] = {"seed": training.seed, "std": self.config.model.init_method_std}
            if dist.get_rank() == 0:
                logger.info("value head initialised: N(0, %g) from --seed %d (recorded in the checkpoints as "
                            "value_head_init)", self.config.model.init_method_std, training.seed)
        if self.config.lora.lora_load is not None:
            return _on_every_rank(partial(self._load_adapters, model))
        return latest, state

    def _moe_args(self) -> dict:
        """The MoE architecture (none for a dense model), as the converters and `check_model_args` read it."""
        moe = self.config.moe
        if not moe.enabled:
            return {}
        return {**{k: v for k, v in asdict(moe).items() if k in CHECKED_MOE_FIELDS},
                "moe_ffn_hidden_size": moe.expert_ffn(self.config.model),
                "moe_layer_freq": moe.layer_pattern(self.config.model.num_layers)}

    def _lora_args(self) -> dict:
        """What a LoRA checkpoint needs to be read back: adapter-only or not, and its base."""
        lora = self.config.lora
        if not lora.enabled:
            return {}
        base = str(Path(self.checkpoint.load).resolve()) if self.checkpoint.load else None
        return {"lora_adapter_only": lora.lora_ckpt_filter, "lora_base": base}

    def _load_adapters(self, model: list) -> tuple[int, dict]:
        """--lora-load: adapters (from an adapter-only or a full checkpoint) on top of --load's base weights;
        the training state of that directory, if it has one, is the run's."""
        root = self.config.lora.lora_load
        latest = latest_iteration(root, "--lora-load")
        state, path = _checked_rank_state(root, latest, self.config)
        for key, chunk in zip(_model_keys(len(model)), model):
            module = unwrap_model(chunk)
            wanted = [k for k in module.state_dict() if trained_with_adapters(k)]
            saved = state.get(key, {})
            missing = [k for k in wanted if k not in saved]
            if missing:
                raise CheckpointError(f"{path}: no adapter tensors {missing[:3]} (check --lora-target-modules and "
                                      "the layout it was saved with)")
            module.load_state_dict({k: saved[k] for k in wanted}, strict=False)
        self.state_root = root
        return latest, state

    def restore_training_state(self, iteration: int, rank_state: dict, optimizer, scheduler) -> TrainState:
        """Optimizer, scheduler and RNG of a resumed run (each skippable as in Megatron-LM)."""
        if not self.checkpoint.no_load_optim:
            optimizer.load_state_dict(rank_state["optimizer"])
            if self.config.parallel.use_distributed_optimizer:
                tp_rank, pp_rank, pp_size = _rank_coordinates()
                ep_rank, ep = _expert_coordinates(self.config)
                directory = Path(self.state_root) / iteration_dir_name(iteration)
                file = rank_file(directory, tp_rank, pp_rank, pp_size, ep_rank, ep).parent / DISTRIBUTED_OPTIMIZER_FILE
                # DP rank 0 of the dense or the experts' data-parallel group reads it (megatron-core's chained
                # optimizer); its checksum is agreed on before the collective load.
                reads = (parallel_state.get_data_parallel_rank() == 0
                         or parallel_state.get_expert_data_parallel_rank() == 0)
                verify = not self.checkpoint.no_verify_checkpoint and reads
                _on_every_rank(partial(verify_files, directory, [file], "--no-verify-checkpoint") if verify else None)
                _load_distributed_optimizer_state(optimizer, file)
            if rank_state["train_state"]["iteration"] < self.config.training.train_iters:
                # Else no step is left to train (the trainer says so): the schedule flags do not matter.
                restore_scheduler(scheduler, rank_state["opt_param_scheduler"], self.config.training)
        if not self.checkpoint.no_load_rng:
            states = rank_state["rng_state"]
            dp_rank = parallel_state.get_data_parallel_rank()
            if len(states) != parallel_state.get_data_parallel_world_size():
                raise CheckpointError(
                    f"the checkpoint holds RNG states for {len(states)} data-parallel ranks, this run has "
                    f"{parallel_state.get_data_parallel_world_size()}; pass --no-load-rng to continue anyway"
                )
            _set_rng_state(states[dp_rank])
        return TrainState(**rank_state["train_state"])



@torch.no_grad()
def _load_distributed_optimizer_state(optimizer, file: Path) -> None:
    """`distrib_optim.pt` into the distributed optimizer's shards.

    megatron-core 0.16.1's loader copies every key of each parameter's optimizer state from the file,
    which holds `param`, `exp_avg` and `exp_avg_sq`; torch's Adam (megatron's optimizer when neither
    transformer-engine nor apex is installed, as on CPU) also keeps a per-parameter `step` there
    (KeyError 'step'). That step was already restored from the param groups by `load_state_dict`, so
    it is set aside during the copy and put back, one tensor per parameter: `load_state_dict` gives every
    parameter the same step tensor, which torch's Adam then increments once per parameter per update
    (a wrong bias correction from the first step after a resume). The copy writes into leaf parameters:
    no autograd.
    """
    inner = [chained.optimizer for chained in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = [{param: state.pop("step") for param, state in opt.state.items() if "step" in state} for opt in inner]
    try:
        optimizer.load_parameter_state(str(file))
    finally:
        for opt, saved in zip(inner, steps):
            for param, step in saved.items():
                opt.state[param]["step"] = step.clone()
