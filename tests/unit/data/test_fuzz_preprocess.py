"""Hostile input: random JSON structures, types, unicode, huge and empty fields.

preprocess() must either write shards or raise DataError naming the file and line; it never
crashes with another exception, and a failed run leaves no output files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.data.preprocess import PreprocessConfig, preprocess
from engine.data.readers import DataError
from engine.tokenizer import TokenizerConfig

text = st.one_of(st.text(max_size=30), st.just(""), st.just("x" * 5000), st.text(alphabet="\u0000\ud7ff\U0001f600é\n\t", max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(text, inner, max_size=3)), max_leaves=8)
fields = ["instruction", "input", "system", "history", "chosen", "rejected", "conversations", "prompt"]
plausible = st.fixed_dictionaries({"instruction": text, "chosen": text, "rejected": text},
                                  optional={"history": json_values, "system": json_values, "input": json_values})
records = st.one_of(
    json_values,  # anything at all, also non-objects
    st.fixed_dictionaries({}, optional={name: json_values for name in fields}),
    plausible, plausible, plausible,  # drawn more often, so some runs get as far as writing shards
)
lines = st.one_of(records.map(lambda r: json.dumps(r, ensure_ascii=False)), st.text(max_size=40))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(lines, min_size=1, max_size=6), handler=st.sampled_from(
    ["AlpacaStylePairwiseHandler", "SharegptStylePairwiseHandler", "TrlStylePairwiseHandler"]),
    skip=st.booleans())
@example(batch=[json.dumps({"instruction": "hi", "chosen": "a", "rejected": "b"}), "{", "[]"],
         handler="AlpacaStylePairwiseHandler", skip=True)
def test_preprocess_never_crashes_on_hostile_records(llama3_dir, batch, handler, skip):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_text("\n".join(batch) + "\n", encoding="utf-8", errors="surrogatepass")
        prefix = Path(tmp) / "out" / "pairs"
        prefix.parent.mkdir()
        config = PreprocessConfig(input=str(source), output_prefix=str(prefix),
                                  tokenizer=TokenizerConfig(tokenizer_name_or_path=llama3_dir),
                                  handler_name=handler, prompt_type="llama3", skip_bad_records=skip,
                                  seq_length=64, log_interval=10**6)
        try:
            summary = preprocess(config)
        except DataError as err:
            assert str(source) in str(err)
            assert not list(prefix.parent.iterdir()), "a failed run left files behind"
        else:
            written = sorted(p.name for p in prefix.parent.iterdir())
            assert len(written) == 8 and summary.pairs_written >= 1
