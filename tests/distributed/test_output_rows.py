"""The output layer on the labelled positions only, and --shared-prompt: the losses, metrics, reference log-probs
and gradients of padded rows with full logits.

Each rank runs one global batch (two micro-batches of two pairs) through megatron's schedule in five ways:
padded rows with the model's full [b, s, vocab / TP] logits read at the labelled positions afterwards (the path
before the selection existed: the baseline), and as the engine runs them (`output_rows`: the output layer and
the log-prob kernel see the positions with a target only) padded, packed, and with shared prompts padded and
packed. The reference pass runs each way too. Under sequence parallelism each TP rank selects from its own
slice of the sequence; under PP only the last stage selects.
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
from engine.model.provider import build_frozen_model, build_trainable_model, unwrap_model
from engine.training.checkpointing import run_layout
from tests.distributed.harness import Layout, layout_cases, run_ranks
from tests.distributed.workers import _iterators, _setup, load_full_state, save_initial_state
from tests.output_rows import at_outputs

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
        "--ffn-hidden-size 64 --seq-length 32 --vocab-size 120 --make-vocab-size-divisible-by 16 --swiglu "
        "--disable-bias-linear --micro-batch-size 2 --global-batch-size 4").split()
DPO, ORPO = "--ld-alpha 0.5 --rpo-alpha 0.3", "--stage orpo"  # ORPO: the prompt positions are selected too


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


MODES = {  # name -> (collate, shared prompt, full logits)
    "padded_full_logits": (collate_pairs, False, True),  # the path before OutputRows: the baseline
    "padded": (collate_pairs, False, False),
    "packed": (pack_pairs, False, False),
    "shared_padded": (collate_pairs, True, False),
    "shared_packed": (pack_pairs, True, False),
}


def _step(config, model, objective, batches, full_logits: bool):
    """One global batch (reference pass, then forward and backward): (metrics, reference log-probs, grads)."""
    run = partial(get_forward_backward_func(), num_microbatches=len(batches), micro_batch_size=2,
                  seq_length=max(b.tokens.shape[1] for b in batches), model=model)
    policy_step, reference_step = objective.policy_forward_step, objective.reference_forward_step
    if full_logits:
        policy_step, reference_step = partial(_full_policy_step, objective), partial(_full_reference_step, objective)
    references = [None] * len(batches)
    if objective.preference.uses_reference:
        collected = run(forward_step_func=reference_step, forward_only=True, collect_non_loss_data=True,
                        data_iterator=_iterators(config, [(b, None) for b in batches]))
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            references = list(collected)
    for chunk in model:
        chunk.zero_grad_buffer()
    collected = run(forward_step_func=policy_step, forward_only=False,
                    data_iterator=_iterators(config, list(zip(batches, references))))
    grads = [p.main_grad.clone() for chunk in model for p in chunk.parameters() if p.requires_grad]
    return reduce_metrics(collected, objective.metric_names), references, grads


def modes_against_full_logits(argv: list[str], state_path: str, objectives: list[str]):
    """Per objective and mode, the step's metrics and gradients on this rank, and their distance to the baseline's
    (padded rows, full logits)."""
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
        outcomes = {}
        for name, (collate, shared, full_logits) in MODES.items():
            batches = [collate(pairs[i:i + 2], 8 * shards, shards=shards, prompt_targets=objective.nll_over_prompt,
                               shared_prompt=shared) for i in (0, 2)]
            objective.share_global_counts(batches)
            outcomes[name] = _step(config, model, objective, batches, full_logits)
        base_metrics, base_refs, base_grads = outcomes.pop("padded_full_logits")
        grad_scale = max(b.abs().max().item() for b in base_grads)
        for name, (metrics, refs, grads) in outcomes.items():
            grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, base_grads))
            ref_diff = max([(a - b).abs().max().item() for a, b in zip(refs, base_refs) if a is not None] or [0.0])
            results.append((f"{flags} {name}", metrics, base_metrics, grad_diff, grad_scale, ref_diff))
    return results


def shared_rows_against_separate(argv: list[str], state_path: str):
    """Every decoder layer's output at each sequence's tokens, and the logits at each answer token, for separate
    padded sequences and for shared-prompt rows (padded and packed): the largest difference."""
    config, platform = _setup(argv)
    model = build_frozen_model(config, platform)[0]
    load_full_state([model], torch.load(state_path), config)
    objective = build_objective(config.preference, config.model.vocab_size)
    layers = []
    for layer in unwrap_model(model).decoder.layers:
        layer.register_forward_hook(lambda module, inputs, output: layers.append(output[0]))
    pairs = _pairs()

    def run(batch):
        """Per layer [rows, s, h]; logits by (sequence, answer token)."""
        layers.clear()
        with torch.no_grad():
            logits = objective._forward(model, batch)[0]
        rows = batch.outputs
        keys = zip(rows.sequence_ids[0].tolist(), rows.answer_ordinal[0].tolist())
        return [h.transpose(0, 1) for h in layers], {key: logits[j] for j, key in enumerate(keys) if key[0] >= 0}

    separate_layers, separate_logits = run(collate_pairs(pairs))
    worst = {}
    for collate in (collate_pairs, pack_pairs):
        batch = collate(pairs, shared_prompt=True)
        shared_layers, shared_logits = run(batch)
        assert shared_logits.keys() == separate_logits.keys()
        diffs = [(shared_logits[k] - separate_logits[k]).abs().max().item() for k in separate_logits]
        n, start = len(pairs), 0
        for i, (prefix, chosen, rejected) in enumerate(batch.pair_layouts):
            row = 0 if batch.cu_seqlens is not None else i
            where = {i: start + torch.arange(prefix + chosen),
                     n + i: start + torch.cat([torch.arange(prefix), prefix + chosen + torch.arange(rejected)])}
            for sequence, positions in where.items():
                for ours, theirs in zip(shared_layers, separate_layers):
                    diffs.append((ours[row, positions] - theirs[sequence, :len(positions)]).abs().max().item())
            start += (prefix + chosen + rejected) if batch.cu_seqlens is not None else 0
        worst[collate.__name__] = max(diffs)
    return worst


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
OBJECTIVES = {"tp1": [DPO, ORPO], "tp2sp": [DPO, ORPO], "pp2": [DPO], "tp2sp_lora": [DPO]}


@layout_cases(LAYOUTS)
def test_selected_positions_and_shared_prompts_give_the_losses_metrics_and_gradients_of_full_logits(layout,
                                                                                                    tiny_state):
    objectives = OBJECTIVES[layout.name]
    for rank_results in run_ranks(modes_against_full_logits, layout.ranks, TINY + layout.argv, tiny_state,
                                  objectives):
        assert len(rank_results) == (len(MODES) - 1) * len(objectives)
        for case, metrics, full_metrics, grad_diff, grad_scale, ref_diff in rank_results:
            assert metrics.keys() == full_metrics.keys() and "loss" in metrics, case
            assert metrics == pytest.approx(full_metrics, rel=1e-5, abs=1e-6), case
            assert grad_scale > 0 and grad_diff <= 1e-5 * grad_scale, (case, grad_diff, grad_scale)
            assert ref_diff <= 1e-5, case


def test_a_shared_prompt_row_gives_every_layer_the_outputs_of_the_two_separate_sequences(tiny_state):
    worst = run_ranks(shared_rows_against_separate, 1, TINY, tiny_state)[0]
    assert set(worst) == {"collate_pairs", "pack_pairs"}
    assert max(worst.values()) <= 1e-5, worst
