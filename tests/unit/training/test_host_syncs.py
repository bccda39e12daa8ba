"""The training step waits for the device a fixed number of times per step, whatever the number of
micro-batches and layers.

One DPO step as the trainer runs it (world size 1, fp32, online reference, packed micro-batches of 2 pairs):
the objective's global counts, the reference's forward-only pass, then `train_step` (policy forward/backward
through megatron's schedule, grad norm, optimizer step, metrics). Counted are the calls that read a device
tensor back to the host or copy host data to the device, each of which waits for the GPU on CUDA: `.item()`,
`.tolist()`, `.cpu()`, `bool()` / `float()` / `int()` of a tensor, `torch.tensor` / `torch.as_tensor` of
tensors or with a device, and `Tensor.new_tensor`. Not counted: a CPU tensor made from a Python number
without a device (megatron's per-micro-batch token counter; no copy) and device fills (`new_full`: the number
is a kernel argument).

Budget, per step (not per micro-batch, not per layer), by who makes the call:
- the engine: 1, the metrics' ratios read back in one `.tolist()` (`reduce_metrics`);
- megatron-core: 5: the gradient norm (`.item()` in clip_grads), `num_tokens > 0` in finalize_model_grads,
  and 3 in its fallback for the norm when neither transformer-engine nor apex is installed, as here
  (`torch.tensor` of the per-parameter norms, `float()` of their norm, `torch.tensor(..., device="cuda")`);
- torch's own AdamW (megatron's CPU fallback) reads each parameter's step counter with `.item()`: a host
  tensor on CUDA as well, so no wait; not counted. On a GPU megatron uses TE's or apex's fused Adam.
The model uses learned absolute positions: megatron-core's unfused THD RoPE (`_apply_rotary_pos_emb_thd`,
used on CPU and on CUDA without transformer-engine's fused RoPE) reads `cu_seqlens` back twice per layer
and micro-batch; with TE, `fusions()` turns on the fused THD RoPE kernel, which reads them on the device.
"""

from __future__ import annotations

import collections
import threading
import traceback

import numpy as np
import pytest
import torch

from engine.training.step import reduce_metrics
from tests.distributed.harness import run_ranks

READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")
ENGINE_BUDGET = {"tolist": 1}
MEGATRON_BUDGET = 5


def _pair(rng: np.random.Generator) -> dict:
    prompt, chosen, rejected = (rng.integers(1, 100, int(n)).tolist() for n in rng.integers(1, 9, 3))
    a = np.asarray
    return {"chosen_input_ids": a(prompt + chosen), "chosen_labels": a([-100] * len(prompt) + chosen),
            "rejected_input_ids": a(prompt + rejected), "rejected_labels": a([-100] * len(prompt) + rejected)}


class HostSyncCounter:
    """Counts the calls listed in the module docstring by caller ('engine', 'megatron', 'torch'), once per
    call: the CPU adaptor's function mode dispatches a call again, and a nested call is the same read."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._depth = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def _caller(self) -> str:
        filename = traceback.extract_stack(limit=3)[0].filename
        for owner in ("engine", "megatron", "torch"):
            if f"/{owner}/" in filename:
                return owner
        return "test"

    def _wrap(self, owner, name: str, counted) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if depth == 0 and counted(args, kwargs):
                self.counts[(self._caller(), name)] += 1
            self._depth.value = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.value = depth

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in READS:
            self._wrap(torch.Tensor, name, lambda args, kwargs: True)
        self._wrap(torch.Tensor, "new_tensor", lambda args, kwargs: True)
        for name in ("tensor", "as_tensor"):
            self._wrap(torch, name, lambda args, kwargs: "device" in kwargs or _holds_tensors(args[0]))
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def by(self, caller: str) -> dict[str, int]:
        return {name: n for (who, name), n in sorted(self.counts.items()) if who == caller}


def _holds_tensors(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    return isinstance(data, (list, tuple)) and any(_holds_tensors(item) for item in data)


def _count_one_step(cases: list[tuple[int, int]]) -> list[dict]:
    """For each (layers, micro-batches): one warm-up step, then the counts of the next one."""
    from engine.arguments import parse_args
    from engine.data.collate import pack_pairs
    from engine.dpo.stages import build_objective
    from engine.initialize import initialize_distributed, set_random_seeds
    from engine.model.provider import build_frozen_model, build_trainable_model
    from engine.training.optimizer import build_optimizer, build_scheduler
    from engine.training.reference import ReferencePolicy
    from engine.training.step import chunk_iterators, prepare_model_config, train_step

    results = []
    for layers, micro_batches in cases:
        config = parse_args(
            f"--num-layers {layers} --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 48 --seq-length 64 "
            "--vocab-size 100 --make-vocab-size-divisible-by 64 --swiglu --disable-bias-linear "
            "--position-embedding-type learned_absolute --micro-batch-size 2 "
            f"--global-batch-size {2 * micro_batches} --train-iters 4 --lr 1e-3".split(), world_size=1)
        platform = initialize_distributed(config.parallel)
        set_random_seeds(config.training.seed)
        model = build_trainable_model(config, platform)
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer)
        prepare_model_config(model, optimizer)
        objective = build_objective(config.preference, config.model.vocab_size)
        reference = ReferencePolicy(build_frozen_model(config, platform), objective)
        rng = np.random.default_rng(layers * 10 + micro_batches)

        def step():
            batches = [pack_pairs([_pair(rng), _pair(rng)]) for _ in range(micro_batches)]
            objective.share_global_counts(batches)
            items = list(zip(batches, reference.logps(batches)))
            return train_step(objective.policy_forward_step, chunk_iterators(items, model), model, optimizer,
                              scheduler, micro_batches, 2, max(b.tokens.shape[1] for b in batches),
                              objective.metric_names)

        step()
        with HostSyncCounter() as counter:
            result = step()
        results.append({"engine": counter.by("engine"), "megatron": counter.by("megatron"),
                        "torch": counter.by("torch"), "loss": result.metrics["loss"]})
    return results


def test_one_step_waits_for_the_device_a_fixed_number_of_times():
    cases = [(1, 2), (2, 2), (2, 4)]
    results = run_ranks(_count_one_step, 1, cases)[0]
    for (layers, micro_batches), counted in zip(cases, results):
        print(f"{layers} layer(s), {micro_batches} micro-batches: {counted}")
        assert counted["engine"] == ENGINE_BUDGET, (layers, micro_batches, counted)
        assert sum(counted["megatron"].values()) <= MEGATRON_BUDGET, (layers, micro_batches, counted)
        assert np.isfinite(counted["loss"])
    # the count does not grow with layers or micro-batches
    assert results[0]["engine"] == results[1]["engine"] == results[2]["engine"]
    assert results[0]["megatron"] == results[1]["megatron"] == results[2]["megatron"]


def test_metric_names_are_declared_not_sent():
    """The names come from the objective; a loss function returning others is refused before any collective."""
    collected = [{"loss": torch.tensor([1.0, 2.0]), "extra": torch.tensor([0.0, 1.0])}]
    with pytest.raises(ValueError, match=r"returned metrics \['extra', 'loss'\], but declared \['loss'\]"):
        reduce_metrics(collected, ["loss"])
