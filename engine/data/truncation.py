"""How a pair too long for --seq-length is cut: shared by preprocessing and by the dataset,
which re-applies it when training with a shorter --seq-length than the shards were made for."""

from __future__ import annotations


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
