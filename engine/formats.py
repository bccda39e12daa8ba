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

UNPAIRED_KEYS = ("completion_input_ids", "completion_labels", "desirable")
"""The three indexed datasets an unpaired (KTO) preprocessing run writes; document i of each is sample i:
prompt + completion ids, the same with prompt positions IGNORE_INDEX, and one id, 1 for a desirable
(thumbs-up) completion, 0 for an undesirable one."""


def output_path_prefix(output_prefix: str, key: str) -> str:
    """Path prefix (without .bin/.idx) of one preprocessed dataset: the layout MindSpeed-LLM uses."""
    return f"{output_prefix}_packed_{key}_document"


def missing_shards_message(prefix: str, keys: tuple[str, ...] = OUTPUT_KEYS) -> str | None:
    """None when all files of a preprocessed prefix exist (eight pairwise, six unpaired: `keys`); else which
    are missing, or, when none is there, that the prefix is not a preprocessing prefix, with a guess at the
    intended one."""
    paths = [output_path_prefix(prefix, k) + ext for k in keys for ext in (".bin", ".idx")]
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
        suffix = f"_packed_{keys[0]}_document.idx"
        found = sorted(glob.glob(os.path.join(glob.escape(prefix), "*" + suffix)))
        if found:
            hint = f" (the directory holds {[f[:-len(suffix)] for f in found]})"
    kind = "pairwise" if keys == OUTPUT_KEYS else "unpaired"
    return (f"--data-path {prefix!r}: no preprocessed {kind} files (expected {paths[0]} and {len(paths) - 1} more); "
            f"pass the prefix given to preprocess_data.py --output-prefix{hint}")

VALUE_HEAD_KEY = "value_head.weight"
"""State-dict key of a reward model's scalar head ([1, hidden], replicated over TP, on the last pipeline stage),
in place of the language model's `output_layer.weight`: its presence marks a reward-model checkpoint."""
