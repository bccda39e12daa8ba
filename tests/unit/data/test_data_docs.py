"""docs/data.md's format examples: each command, run on its record, writes the same pair.

Every ``<!-- example: NAME -->`` in docs/data.md is a JSON record followed by a preprocess_data.py command.
The command runs as written, with only its --input (the record, as JSONL or as a ``save_to_disk``
folder) and --output-prefix redirected and a tiny Qwen tokenizer added; all examples must give the
shards of one reference pair.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

import preprocess_data
from engine.data.records import Conversation
from engine.data.templates import build_chat_encoder
from engine.formats import IGNORE_INDEX, OUTPUT_KEYS, output_path_prefix
from engine.tokenizer import TokenizerConfig, build_tokenizer
from tests.unit.data.test_readers import save_like_datasets

DOC = Path(__file__).resolve().parents[3] / "docs" / "data.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```\n```bash\n(.*?)\n```", re.S)
EXAMPLES = {name: (json.loads(record), command.replace("\\\n", " ")) for name, record, command in EXAMPLE.findall(
    DOC.read_text(encoding="utf-8"))}


def test_docs_hold_the_examples():
    assert set(EXAMPLES) == {"alpaca", "alpaca_output", "alpaca_input_only", "sharegpt", "trl_prompt",
                             "trl_implicit", "stack_exchange_saved_dataset"}


@pytest.fixture(scope="module")
def expected(family_tokenizer_dir):
    path = family_tokenizer_dir("qwen")
    chat = build_chat_encoder("auto", build_tokenizer(TokenizerConfig(tokenizer_name_or_path=path)))
    pairs = chat.encode(Conversation("Name a prime.", "Be brief."), "7", "8")
    return path, {side: (ids, [IGNORE_INDEX] * n + ids[n:]) for side, (ids, n) in zip(("chosen", "rejected"), pairs)}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_writes_the_reference_pair(name, expected, tmp_path):
    tokenizer_dir, pair = expected
    record, command = EXAMPLES[name]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "preprocess_data.py"]
    argv = argv[2:]
    source = argv[argv.index("--input") + 1]
    if source.endswith(".jsonl"):
        data = tmp_path / "data.jsonl"
        data.write_text(json.dumps(record) + "\n")
    else:  # a save_to_disk folder
        data = save_like_datasets(tmp_path / source, [[record]])
    argv[argv.index("--input") + 1] = str(data)
    argv[argv.index("--output-prefix") + 1] = str(tmp_path / "out" / "pairs")
    argv += ["--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", tokenizer_dir]
    assert preprocess_data.main(argv) == 0
    written = {k: IndexedDataset(output_path_prefix(str(tmp_path / "out" / "pairs"), k)) for k in OUTPUT_KEYS}
    for side in ("chosen", "rejected"):  # (the datasets stay referenced: their items are views of a memory map)
        assert (written[f"{side}_input_ids"][0].tolist(), written[f"{side}_labels"][0].tolist()) == pair[side], side
    assert len(list((tmp_path / "out").iterdir())) == 2 * len(OUTPUT_KEYS)
