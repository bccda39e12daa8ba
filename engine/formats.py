"""Conventions shared by several layers (preprocessing, training, flag validation).

Kept free of torch and of every other engine module so the lowest layer, the flag
declarations, can check a --data-path without loading the data code.
"""

from __future__ import annotations

import glob
import os
import re

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens, padding): torch's cross-entropy default."""

OUTPUT_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
"""The four indexed datasets a pairwise preprocessing run writes; document i of each is pair i."""
MARGIN_KEY = "margin"
"""An optional fifth dataset, `PREFIX_packed_margin_document.{bin,idx}`: float32, document i is pair i's reward
margin (one value), written when --map-keys names a `margin` column; --stage rm subtracts it in its loss."""


def output_path_prefix(output_prefix: str, key: str) -> str:
    """Path prefix (without .bin/.idx) of one preprocessed dataset: the layout MindSpeed-LLM uses."""
    return f"{output_prefix}_packed_{key}_document"


def missing_shards_message(prefix: str) -> str | None:
    """None when all eight files of a preprocessed prefix exist; else which are missing, or, when none
    is there, that the prefix is not a preprocessing prefix, with a guess at the intended one."""
    paths = [output_path_prefix(prefix, k) + ext for k in OUTPUT_KEYS for ext in (".bin", ".idx")]
    present = [p for p in paths if os.path.exists(p)]
    if len(present) == len(paths):
        return None
    if present:
        missing = [p for p in paths if p not in present]
        return f"--data-path {prefix!r}: incomplete preprocessed data set; missing {missing}, present {present}"
    hint = ""
    match = re.fullmatch(r"(.*)_packed_\w+?_document(\.bin|\.idx)?", prefix)
    if match:
        hint = f" (did you mean {match.group(1)!r}?)"
    elif os.path.isdir(prefix):
        suffix = "_packed_chosen_input_ids_document.idx"
        found = sorted(glob.glob(os.path.join(glob.escape(prefix), "*" + suffix)))
        if found:
            hint = f" (the directory holds {[f[:-len(suffix)] for f in found]})"
    return (f"--data-path {prefix!r}: no preprocessed pairwise files (expected {paths[0]} and seven more); "
            f"pass the prefix given to preprocess_data.py --output-prefix{hint}")

VALUE_HEAD_KEY = "value_head.weight"
"""State-dict key of a reward model's scalar head ([1, hidden], replicated over TP, on the last pipeline stage),
in place of the language model's `output_layer.weight`: its presence marks a reward-model checkpoint."""
