"""What preprocessing does to what is already at --output-prefix: a killed run's staging files, a live
run's, and an existing data set (replaced only with --overwrite)."""

import errno
import fcntl
import logging
import os
import re
import subprocess

import pytest

import preprocess_data
from engine.data.preprocess import OUTPUT_KEYS, PrefixLock
from engine.data.readers import DataError
from tests.unit.data.test_preprocess import make_records, read_back, run, write_jsonl

OUTPUTS = sorted(f"out_packed_{k}_document.{ext}" for k in OUTPUT_KEYS for ext in ("bin", "idx"))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def staging_files(directory, name, pid):
    """The eight staging files a run of pid writes for prefix DIR/NAME (as a SIGKILL leaves them)."""
    paths = [directory / f".{name}.tmp{pid}_packed_{k}_document.{ext}" for k in OUTPUT_KEYS for ext in ("bin", "idx")]
    for path in paths:
        path.write_bytes(b"half-written")
    return paths


def test_a_killed_runs_staging_files_are_removed_and_reported(tmp_path, llama3_dir, caplog):
    shards = tmp_path / "shards"
    shards.mkdir()
    pid = dead_pid()
    stale = staging_files(shards, "out", pid)
    (shards / ".out.lock").write_text(f"pid {pid} on somehost since 2024-01-01 00:00:00")  # no holder: killed
    others = staging_files(shards, "out2", pid) + staging_files(shards, "out.tmp1", pid)  # other prefixes
    (shards / ".out.tmp-notes").write_text("not a staging file")
    with caplog.at_level(logging.WARNING, logger="engine.data.preprocess"):
        summary, _ = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", make_records(4)))
    assert summary.pairs_written == 4
    assert not any(p.exists() for p in stale)
    assert sorted(os.listdir(shards)) == sorted(OUTPUTS + [p.name for p in others] + [".out.tmp-notes"])
    [message] = [r.getMessage() for r in caplog.records if "staging file" in r.getMessage()]
    assert message.startswith(f"removed 8 staging file(s) of --output-prefix {shards / 'out'} left by a killed "
                              f"run (pid {pid}): .out.tmp{pid}_packed_chosen_input_ids_document.bin")


def test_a_live_runs_staging_files_are_left_alone(tmp_path, llama3_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    live = PrefixLock(str(shards), "out")  # another run writing the same prefix holds this lock
    files = staging_files(shards, "out", os.getpid())
    data = write_jsonl(tmp_path / "d.jsonl", make_records(4))
    with pytest.raises(DataError, match=f"--output-prefix {shards / 'out'} is being written by another "
                                        f"preprocess_data.py run \\(pid {os.getpid()} on .*\\); wait for it"):
        run(tmp_path, llama3_dir, data)
    assert all(p.read_bytes() == b"half-written" for p in files)
    live.release()  # that run died: its files are now stale
    run(tmp_path, llama3_dir, data)
    assert sorted(os.listdir(shards)) == OUTPUTS


def test_an_existing_data_set_needs_overwrite(tmp_path, llama3_dir):
    _, prefix = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "a.jsonl", make_records(3)))
    bigger = write_jsonl(tmp_path / "b.jsonl", make_records(5))
    with pytest.raises(DataError) as info:
        run(tmp_path, llama3_dir, bigger)
    assert str(info.value) == (f"--output-prefix {prefix} holds a data set already ({prefix}_packed_chosen_input_ids_"
                               "document.bin and 7 more); pass --overwrite to replace it, or choose another "
                               "--output-prefix")
    assert len(read_back(prefix)["chosen_input_ids"]) == 3
    run(tmp_path, llama3_dir, bigger, overwrite=True)
    assert len(read_back(prefix)["rejected_labels"]) == 5
    assert sorted(os.listdir(tmp_path / "shards")) == OUTPUTS


def test_one_leftover_file_of_a_data_set_also_needs_overwrite(tmp_path, llama3_dir):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "out_packed_rejected_labels_document.idx").write_bytes(b"old")
    with pytest.raises(DataError, match=r"out_packed_rejected_labels_document.idx\); pass --overwrite"):
        run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", make_records(2)))


def test_a_failed_overwrite_keeps_the_old_data_set(tmp_path, llama3_dir):
    _, prefix = run(tmp_path, llama3_dir, write_jsonl(tmp_path / "a.jsonl", make_records(3)))
    broken = tmp_path / "b.jsonl"
    broken.write_text("{broken\n")
    with pytest.raises(DataError, match="malformed JSON"):
        run(tmp_path, llama3_dir, broken, overwrite=True)
    assert len(read_back(prefix)["chosen_input_ids"]) == 3
    assert sorted(os.listdir(tmp_path / "shards")) == OUTPUTS


def test_cli_refuses_an_existing_prefix_in_one_line_and_overwrites_with_the_flag(tmp_path, llama3_dir, capsys):
    argv = ["--input", write_jsonl(tmp_path / "d.jsonl", make_records(2)), "--tokenizer-type", "PretrainedFromHF",
            "--tokenizer-name-or-path", llama3_dir, "--output-prefix", str(tmp_path / "o" / "x"),
            "--prompt-type", "llama3"]
    assert preprocess_data.main(argv) == 0
    capsys.readouterr()
    assert preprocess_data.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output-prefix {tmp_path / 'o' / 'x'} holds a data set")
    assert "--overwrite" in err[0]
    assert preprocess_data.main(argv + ["--overwrite"]) == 0


def test_a_filesystem_without_flock_is_a_clear_error(tmp_path, llama3_dir, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = re.escape(str(tmp_path / "shards" / ".out.lock"))
    with pytest.raises(DataError, match=rf"cannot lock {lock} \(No locks available\); write to a filesystem with flock"):
        run(tmp_path, llama3_dir, write_jsonl(tmp_path / "d.jsonl", make_records(2)))
    assert os.listdir(tmp_path / "shards") == [".out.lock"]  # nothing written: the lock was never held
