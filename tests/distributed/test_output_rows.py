"""The output layer on the labelled positions only: the same losses, metrics and gradients as full logits.

Each rank runs one global batch (two micro-batches of two pairs, padded and packed) twice through megatron's
schedule: once as the engine does (`output_rows`: the output layer and the log-prob kernel see the positions
with a target only), once with the model's full [b, s, vocab / TP] logits, read at the same positions
afterwards (the path before the selection existed). The reference pass goes both ways too. Under sequence
parallelism each TP rank selects from its own slice of the sequence; under PP only the last stage selects.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from engine.arguments import parse_args
from engine.data.collate import collate_pairs, pack_pairs
from engine.dpo.stages import build_objective
from engine.model.attention import HostPackedSeqParams
from engine.training.step import prepare_model_config, reduce_metrics
from engine.checkpoint.sharding import shard_state_dict
from engine.model.provider import build_trainable_model, unwrap_model
from engine.training.checkpointing import run_layout
from tests.distributed.harness import Layout, layout_cases, run_ranks
from tests.distributed.workers import _iterators, _setup, load_full_state, save_initial_state
from tests.output_rows import at_outputs

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 64 --seq-length 32 --vocab-size 120 --make-vocab-size-divisible-by 16 --swiglu "
        "--disable-bias-linear --micro-batch-size 2 --global-batch-size 4").split()
OBJECTIVES = ["--ld-alpha 0.5 --rpo-alpha 0.3", "--stage orpo"]


def _pairs() -> list[dict]:
    rng = np.random.default_rng(0)
    pairs = []
    for prompt, chosen, rejected in ((5, 4, 7), (9, 3, 2), (2, 8, 5), (7, 6, 6)):
        head = rng.integers(1, 120, prompt)
        pair = {}
        for side, length in (("chosen", chosen), ("rejected", rejected)):
            ids = np.concatenate([head, rng.integers(1, 120, length)])
            pair[f"{side}_input_ids"] = ids
            pair[f"{side}_labels"] = np.concatenate([np.full(prompt, -100), ids[prompt:]])
        pairs.append(pair)
    return pairs


def _full_forward(objective, model, batch):
    """The model's logits at every position (no `output_rows`)."""
    if batch.cu_seqlens is None:
        return model(batch.tokens, batch.position_ids, None)
    packed = HostPackedSeqParams(qkv_format="thd", cu_seqlens_q=batch.cu_seqlens, cu_seqlens_kv=batch.cu_seqlens,
                                 max_seqlen_q=batch.max_seqlen, max_seqlen_kv=batch.max_seqlen,
                                 seq_lengths=tuple(batch.seq_lengths))
    return model(batch.tokens, batch.position_ids, None, packed_seq_params=packed)


def _full_policy_step(objective, data_iterator, model):
    batch, reference = next(data_iterator)
    return _full_forward(objective, model, batch), lambda out: objective.loss_func(batch, reference,
                                                                                   at_outputs(out, batch))


def _full_reference_step(objective, data_iterator, model):
    batch, _ = next(data_iterator)
    return (_full_forward(objective, model, batch),
            lambda out, non_loss_data=True: objective._reference_logps(batch, at_outputs(out, batch)))


def _load_base(model: list, full: dict, config) -> None:
    """The saved base weights; LoRA's adapters keep their seeded initialization (B = 0: their A gets no gradient,
    their B does)."""
    if not config.lora.enabled:
        return load_full_state(model, full, config)
    for chunk in model:
        unwrap_model(chunk).load_state_dict(shard_state_dict(full, run_layout(config),
                                                             parallel_state.get_tensor_model_parallel_rank(),
                                                             parallel_state.get_pipeline_model_parallel_rank(), None),
                                            strict=False)


def selected_and_full(argv: list[str], state_path: str, objectives: list[str]):
    """Per objective and layout (padded, packed), the step's metrics and gradients both ways on this rank."""
    _, platform = _setup(argv)
    results = []
    for flags in objectives:
        config = parse_args(argv + flags.split(), world_size=torch.distributed.get_world_size())
        model = build_trainable_model(config, platform)
        _load_base(model, torch.load(state_path), config)
        prepare_model_config(model, None)
        objective = build_objective(config.preference, config.model.vocab_size)
        par = config.parallel
        shards = par.tensor_model_parallel_size if par.sequence_parallel else 1
        pairs = _pairs()
        for collate in (collate_pairs, pack_pairs):
            batches = [collate(pairs[i:i + 2], 8 * shards, shards=shards, prompt_targets=objective.nll_over_prompt)
                       for i in (0, 2)]
            objective.share_global_counts(batches)
            run = partial(get_forward_backward_func(), num_microbatches=2, micro_batch_size=2,
                          seq_length=max(b.tokens.shape[1] for b in batches), model=model)
            outcome = []
            for policy_step, reference_step in ((objective.policy_forward_step, objective.reference_forward_step),
                                                (partial(_full_policy_step, objective),
                                                 partial(_full_reference_step, objective))):
                references = [None, None]
                if objective.preference.uses_reference:
                    collected = run(forward_step_func=reference_step, forward_only=True, collect_non_loss_data=True,
                                    data_iterator=_iterators(config, [(b, None) for b in batches]))
                    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                        references = list(collected)
                for chunk in model:
                    chunk.zero_grad_buffer()
                collected = run(forward_step_func=policy_step, forward_only=False,
                                data_iterator=_iterators(config, list(zip(batches, references))))
                metrics = reduce_metrics(collected, objective.metric_names)
                grads = [p.main_grad.clone() for chunk in model for p in chunk.parameters() if p.requires_grad]
                outcome.append((metrics, references, grads))
            (metrics, refs, grads), (full_metrics, full_refs, full_grads) = outcome
            grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, full_grads))
            grad_scale = max(b.abs().max().item() for b in full_grads)
            ref_diff = max([(a - b).abs().max().item() for a, b in zip(refs, full_refs) if a is not None] or [0.0])
            results.append((flags, collate.__name__, metrics, full_metrics, grad_diff, grad_scale, ref_diff))
    return results


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("state") / "tiny.pt")
    run_ranks(save_initial_state, 1, TINY, path)
    return path


LAYOUTS = [
    Layout("tp1", 1),
    Layout("tp2sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
    Layout("pp2", 2, "--pipeline-model-parallel-size 2"),
    Layout("tp2sp_lora", 2, "--tensor-model-parallel-size 2 --sequence-parallel --lora-r 4 --lora-alpha 8"),
]


@layout_cases(LAYOUTS)
def test_selected_positions_give_the_losses_metrics_and_gradients_of_full_logits(layout, tiny_state):
    for rank_results in run_ranks(selected_and_full, layout.ranks, TINY + layout.argv, tiny_state, OBJECTIVES):
        assert len(rank_results) == 2 * len(OBJECTIVES)
        for flags, collate, metrics, full_metrics, grad_diff, grad_scale, ref_diff in rank_results:
            case = f"{flags} {collate}"
            assert metrics.keys() == full_metrics.keys() and "loss" in metrics, case
            assert metrics == pytest.approx(full_metrics, rel=1e-5, abs=1e-6), case
            assert grad_scale > 0 and grad_diff <= 1e-5 * grad_scale, (case, grad_diff, grad_scale)
            assert ref_diff <= 1e-5, case
