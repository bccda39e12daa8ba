"""examples/tiny/quickstart.sh deletes nothing it did not make, whatever OUT the environment sets.

The script is copied into a scratch repository whose scripts/setup_env.sh (the first step after
preparing OUT) records that it was reached and stops the run, so only the OUT handling executes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = ".quickstart"


@pytest.fixture
def quickstart(tmp_path):
    """Runs the quickstart in a scratch repository with OUT set; returns (exit code, stderr, setup reached)."""
    repo = tmp_path / "repo"
    (repo / "examples" / "tiny").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(REPO / "examples" / "tiny" / "quickstart.sh", repo / "examples" / "tiny" / "quickstart.sh")
    reached = tmp_path / "setup-reached"
    (repo / "scripts" / "setup_env.sh").write_text(f'touch "{reached}"\nexit 3\n')

    def run(out: Path) -> tuple[int, str, bool]:
        reached.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(repo / "examples" / "tiny" / "quickstart.sh")], capture_output=True,
                                text=True, timeout=30, env={"PATH": os.environ["PATH"], "OUT": str(out)})
        return result.returncode, result.stderr, reached.exists()

    return run


def test_a_users_folder_is_refused_and_left_as_it_was(tmp_path, quickstart):
    out = tmp_path / "my-project"
    (out / "hf_model").mkdir(parents=True)  # even a name the quickstart uses
    (out / "hf_model" / "weights.bin").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    code, err, reached = quickstart(out)
    assert (code, reached) == (1, False)
    assert f"OUT={out} is not empty and was not made by the quickstart (no {MARKER} file in it)" in err
    assert sorted(p.name for p in out.iterdir()) == ["hf_model", "notes.txt"]
    assert (out / "hf_model" / "weights.bin").read_text() == "mine"


def test_a_file_as_out_is_refused(tmp_path, quickstart):
    out = tmp_path / "a-file"
    out.write_text("mine")
    code, err, reached = quickstart(out)
    assert (code, reached) == (1, False) and "is not a folder" in err and out.read_text() == "mine"


@pytest.mark.parametrize("exists", [False, True], ids=["new", "empty"])
def test_a_new_or_empty_folder_is_used_and_marked(tmp_path, quickstart, exists):
    out = tmp_path / "run"
    if exists:
        out.mkdir()
    code, _, reached = quickstart(out)
    assert (code, reached) == (3, True)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_a_rerun_removes_only_what_the_quickstart_made(tmp_path, quickstart):
    out = tmp_path / "run"
    assert quickstart(out)[2]
    for made in ("hf_model", "mg_tp2/iter_0000001", "data", "dpo/iter_0000015", "hf_dpo", "tensorboard",
                 ".mg_tp2.staging-123-abcd"):
        (out / made).mkdir(parents=True)
    for made in ("pairs.jsonl", "convert.log", "dpo_metrics.png", "dpo/metrics.jsonl"):
        (out / made).write_text("old")
    (out / "notes.txt").write_text("the user's")
    (out / "analysis").mkdir()
    code, _, reached = quickstart(out)
    assert (code, reached) == (3, True)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "analysis", "notes.txt"])
    assert (out / "notes.txt").read_text() == "the user's"


def test_every_path_the_steps_write_is_in_the_list_a_rerun_removes():
    """A path added to a step but not to `made` would survive re-runs (stale output mixed with new)."""
    text = (REPO / "examples" / "tiny" / "quickstart.sh").read_text()
    made = set(re.search(r"^made=\(([^)]*)\)", text, re.M).group(1).split())
    used = set(re.findall(r"\$OUT/([\w.]+)", text))
    assert used and used <= made, f"written under $OUT but not removed on a re-run: {sorted(used - made)}"
