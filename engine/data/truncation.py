"""How a pair too long for --seq-length is cut: shared by preprocessing and by the dataset,
which re-applies it when training with a shorter --seq-length than the shards were made for."""

from __future__ import annotations

from typing import Sequence, TypeVar

Ids = TypeVar("Ids", bound=Sequence[int])


def truncate_lengths(prompt: int, response: int, seq_length: int) -> tuple[int, int]:
    """Tokens kept of (prompt, longest response) so that their sum fits ``seq_length``.

    The response start is always kept. A short response (under half the budget)
    is kept whole and the prompt is cut; else a short prompt is kept whole and
    the response is cut; else both are cut in proportion to their lengths.
    The prompt loses its beginning (the final user turn and the assistant
    header stay next to the answer); responses lose their end.
    """
    if prompt + response <= seq_length:
        return prompt, response
    if 2 * response < seq_length:
        return seq_length - response, response
    if 2 * prompt < seq_length:
        return prompt, seq_length - prompt
    kept_response = max(1, seq_length * response // (prompt + response))
    return seq_length - kept_response, kept_response


def cut_sequence(ids: Ids, prompt: int, keep_prompt: int, keep_answer: int) -> tuple[Ids, int]:
    """One sequence (``prompt`` tokens, then its answer) cut to the kept lengths: the prompt's last
    ``keep_prompt`` tokens (all of a shorter one, whose side of a pair may have fewer prompt tokens) and the
    answer's first ``keep_answer``. Returns the ids and the prompt tokens kept."""
    kept = min(prompt, keep_prompt)
    return ids[prompt - kept:prompt + keep_answer], kept
