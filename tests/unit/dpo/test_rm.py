"""--stage rm's loss: rewards read at each sequence's last token (padded and packed rows), the Bradley-Terry
loss with the data's margins and TRL's reward centering, against values computed by hand."""

import numpy as np
import pytest
import torch

from engine.arguments import PreferenceConfig
from engine.data.collate import collate_pairs, pack_pairs
from engine.dpo.stages import build_objective
from engine.formats import IGNORE_INDEX

REWARDS = {"chosen": [1.0, 0.5], "rejected": [0.2, 0.9]}
LENGTHS = {"chosen": [5, 6], "rejected": [4, 3]}  # prompts of 2 tokens


def _samples(margins=None):
    samples = []
    for i in range(2):
        sample = {}
        for side in ("chosen", "rejected"):
            ids = np.arange(3, 3 + LENGTHS[side][i], dtype=np.int64)
            labels = ids.copy()
            labels[:2] = IGNORE_INDEX
            sample.update({f"{side}_input_ids": ids, f"{side}_labels": labels})
        if margins is not None:
            sample["margin"] = margins[i]
        samples.append(sample)
    return samples


def _values(batch) -> torch.Tensor:
    """Noise everywhere but at each sequence's last token, which holds its reward."""
    values = torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(0)) * 5
    rewards = REWARDS["chosen"] + REWARDS["rejected"]
    lengths = LENGTHS["chosen"] + LENGTHS["rejected"]
    start = 0
    for k, (reward, length) in enumerate(zip(rewards, lengths)):
        if batch.cu_seqlens is None:
            values[k, length - 1] = reward
        else:
            values[0, start + length - 1] = reward
            start += length
    return values.requires_grad_()


def _objective(**flags):
    preference = PreferenceConfig(stage="rm", **flags)
    preference.check()
    return build_objective(preference, vocab_size=100)


@pytest.mark.parametrize("collate", [collate_pairs, pack_pairs], ids=["padded", "packed"])
@pytest.mark.parametrize("margins, center, per_pair", [
    (None, None, [0.3711006659477777, 0.9130152523999526]),  # -logsig(0.8), -logsig(-0.4)
    ([0.5, -1.0], 0.1, [0.5543552444685271 + 0.1 * 1.2 ** 2, 0.4374879504858856 + 0.1 * 1.4 ** 2]),
], ids=["plain", "margin_and_centering"])
def test_loss_and_metrics_by_hand(collate, margins, center, per_pair):
    batch = collate(_samples(margins))
    values = _values(batch)
    total, count, metrics = _objective(center_rewards_coefficient=center).loss_func(batch, None, values)
    assert total.item() == pytest.approx(sum(per_pair), abs=1e-6)
    assert count.item() == 2
    means = {name: (pair[0] / pair[1]).item() for name, pair in metrics.items()}
    assert means == pytest.approx({"loss": sum(per_pair) / 2, "rewards/chosen": 0.75, "rewards/rejected": 0.55,
                                   "rewards/margins": 0.2, "rewards/accuracies": 0.5}, abs=1e-6)
    total.backward()  # only the last tokens' values carry gradient
    assert torch.count_nonzero(values.grad).item() == 4


def test_rm_flags_refuse_what_does_not_apply():
    from engine.options import ConfigError

    for flags, message in (({"ref_model": "ckpt"}, "--ref-model does not apply: --stage rm builds no reference"),
                           ({"dpo_beta": 0.1}, "--dpo-beta does not apply to --stage rm"),
                           ({"dpo_label_smoothing": 0.1}, "not to --stage rm"),
                           ({"rpo_alpha": 0.1}, "--rpo-alpha does not apply to --stage rm"),
                           ({"precompute_ref_logps": True}, "--precompute-ref-logps does not apply"),
                           ({"reference_free": True}, "--stage rm is reference-free already"),
                           ({"center_rewards_coefficient": -1.0}, "--center-rewards-coefficient must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            _objective(**flags)
    with pytest.raises(ConfigError, match="--center-rewards-coefficient does not apply to --stage dpo"):
        PreferenceConfig(center_rewards_coefficient=0.1).check()
