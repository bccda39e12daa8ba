"""Conventions shared by several layers (preprocessing, training, flag validation).

Kept free of torch and of every other engine module so the lowest layer, the flag
declarations, can check a --data-path without loading the data code.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens, padding): torch's cross-entropy default."""

OUTPUT_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
"""The four indexed datasets a pairwise preprocessing run writes; document i of each is pair i."""


def output_path_prefix(output_prefix: str, key: str) -> str:
    """Path prefix (without .bin/.idx) of one preprocessed dataset: the layout MindSpeed-LLM uses."""
    return f"{output_prefix}_packed_{key}_document"
