"""collate_pairs: [chosen x n ; rejected x n] rows, shifted labels, padding to a multiple only."""

import numpy as np
import pytest
import torch

from engine.data.collate import PairBatch, collate_pairs
from engine.formats import IGNORE_INDEX
from engine.data.readers import DataError

M = IGNORE_INDEX


def pair(prompt, chosen, rejected):
    a = np.asarray
    return {"chosen_input_ids": a(prompt + chosen), "chosen_labels": a([M] * len(prompt) + chosen),
            "rejected_input_ids": a(prompt + rejected), "rejected_labels": a([M] * len(prompt) + rejected)}


def test_rows_shift_and_padding():
    samples = [pair([1, 2], [3, 4], [5]), pair([6], [7, 8, 9, 10, 11, 12, 13, 14], [15, 16])]
    batch = collate_pairs(samples, pad_to_multiple_of=8, pad_id=0)
    assert isinstance(batch, PairBatch) and batch.num_pairs == 2
    assert batch.tokens.shape == batch.labels.shape == batch.position_ids.shape == (4, 16)  # longest 9 -> 16
    assert batch.tokens.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.int64
    pad = lambda row: row + [0] * (16 - len(row))  # noqa: E731
    ign = lambda row: row + [M] * (16 - len(row))  # noqa: E731
    assert batch.tokens.tolist() == [pad([1, 2, 3, 4]), pad([6, 7, 8, 9, 10, 11, 12, 13, 14]),
                                     pad([1, 2, 5]), pad([6, 15, 16])]
    # labels[t] = label[t + 1]; the prompt's last position predicts the first response token
    assert batch.labels.tolist() == [ign([M, 3, 4]), ign([7, 8, 9, 10, 11, 12, 13, 14]),
                                     ign([M, 5]), ign([15, 16])]
    assert (batch.position_ids == torch.arange(16)).all()
    assert (batch.labels != M).sum().item() == 2 + 8 + 1 + 2


def test_pad_id_and_multiple():
    samples = [pair([1], [2, 3], [4])]
    assert collate_pairs(samples, pad_to_multiple_of=1).tokens.shape == (2, 3)
    assert collate_pairs(samples, pad_to_multiple_of=3).tokens.shape == (2, 3)
    batch = collate_pairs(samples, pad_to_multiple_of=12, pad_id=99)
    assert batch.tokens.shape == (2, 12)
    assert batch.tokens[1].tolist() == [1, 4] + [99] * 10
    assert batch.labels[1].tolist() == [4] + [M] * 11


def test_row_without_response_token_is_an_error():
    ok = pair([1], [2], [3])
    with pytest.raises(DataError, match="sample 1: the rejected sequence has no response token"):
        collate_pairs([ok, pair([1, 2], [3], [])])
    with pytest.raises(DataError, match="sample 0: the chosen sequence"):
        collate_pairs([pair([], [5], [6, 7])])  # a lone first token has nothing before it to predict it


def test_bad_arguments():
    with pytest.raises(ValueError):
        collate_pairs([])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        collate_pairs([pair([1], [2], [3])], pad_to_multiple_of=0)


def test_padding_marks_the_positions_that_hold_no_sequence():
    """The mask an MoE model's routers leave out of their losses: each padded row's tail, a packed row's tail
    segment, a --shared-prompt row's tail."""
    from engine.data.collate import pack_pairs

    samples = [pair([1, 2], [3, 4], [5]), pair([6], [7, 8, 9], [15, 16])]
    padded = collate_pairs(samples, pad_to_multiple_of=8)
    assert padded.padding.tolist() == [[t >= n for t in range(8)] for n in (4, 4, 3, 3)]
    packed = pack_pairs(samples, pad_to_multiple_of=8)  # 4 + 4 + 3 + 3 = 14 tokens, then a tail of 2
    assert packed.padding.tolist() == [[t >= 14 for t in range(16)]]
    assert torch.equal(packed.padding, packed.sequence_ids < 0)
    shared = collate_pairs(samples, pad_to_multiple_of=8, shared_prompt=True)  # [1 2 3 4 5], [6 7 8 9 15 16]
    assert shared.padding.tolist() == [[t >= n for t in range(8)] for n in (5, 6)]
    assert pack_pairs(samples, pad_to_multiple_of=4, shared_prompt=True).padding.tolist() == [[False] * 11 + [True]]
