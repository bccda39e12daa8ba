"""tools/plot_metrics.py: a run's JSONL or TensorBoard log becomes one PNG; bad input is a clear error."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot_metrics():
    spec = importlib.util.spec_from_file_location("_plot_metrics", REPO / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(split: str, iteration: int) -> dict:
    """A line as engine/training/metrics.py writes it (TRL names, plus non-plotted fields)."""
    return {"split": split, "iteration": iteration, "consumed_pairs": 16 * iteration, "loss": 0.7 - 0.01 * iteration,
            "rewards/chosen": 0.01 * iteration, "rewards/rejected": -0.02 * iteration,
            "rewards/accuracies": min(1.0, 0.1 * iteration), "rewards/margins": 0.03 * iteration,
            "lr": 1e-4 * iteration, "grad_norm": 1.5}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_jsonl_log_gives_one_png_with_every_panel(plot_metrics, tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    rows = [_row("train", i) for i in range(1, 11)] + [_row("valid", 5), _row("valid", 10)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "plots" / "run.png"
    assert plot_metrics.main([str(log), "--output", str(out)]) == 0
    assert _png_size(out) == (1500, 800)  # figsize 15 x 8 at dpi 100
    assert f"wrote {out}" in capsys.readouterr().out

    series = plot_metrics.read_jsonl(log)
    for metric in plot_metrics.PANELS:
        assert len(series["train"][metric]) == 10, metric
    assert series["train"]["loss"][0] == (1, pytest.approx(0.69))
    assert [i for i, _ in series["valid"]["rewards/margins"]] == [5, 10]
    assert "split" not in series["train"] and "iteration" not in series["train"]


def test_tensorboard_log_gives_a_png(plot_metrics, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tb"
    writer = SummaryWriter(log_dir=str(logdir))
    for i in range(1, 6):
        for key, value in _row("train", i).items():
            if key not in ("split", "iteration"):
                writer.add_scalar(f"train/{key}", value, i)  # the tags engine/training/metrics.py writes
    writer.add_scalar("valid/loss", 0.65, 5)
    writer.close()

    series = plot_metrics.read_tensorboard(logdir)
    assert [i for i, _ in series["train"]["rewards/accuracies"]] == [1, 2, 3, 4, 5]
    assert series["train"]["lr"][-1][1] == pytest.approx(5e-4)
    assert series["valid"]["loss"] == [(5, pytest.approx(0.65))]
    out = tmp_path / "tb.png"
    assert plot_metrics.main([str(logdir), "--output", str(out), "--title", "tb run"]) == 0
    assert _png_size(out) == (1500, 800)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"split": "train", "iteration": 1, "loss": 0.69}\n{"loss": \n', "metrics.jsonl:2: not JSON"),
        ('[1, 2]\n', 'metrics.jsonl:1: expected a JSON object with an integer "iteration"'),
        ('{"split": "train", "loss": 0.69}\n', 'metrics.jsonl:1: expected a JSON object with an integer "iteration"'),
        ('{"split": "valid", "iteration": 1, "loss": 0.69}\n', "holds no training metrics"),
        ("", "holds no training metrics"),
    ],
    ids=["malformed-line", "not-an-object", "no-iteration", "valid-only", "empty"],
)
def test_bad_jsonl_is_an_error_and_writes_nothing(plot_metrics, tmp_path, capsys, content, message):
    log = tmp_path / "metrics.jsonl"
    log.write_text(content)
    out = tmp_path / "run.png"
    assert plot_metrics.main([str(log), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics.py: error: ") and message in err
    assert not out.exists()


def test_missing_source_and_empty_tensorboard_dir_are_errors(plot_metrics, tmp_path, capsys):
    out = tmp_path / "run.png"
    assert plot_metrics.main([str(tmp_path / "nothing.jsonl"), "--output", str(out)]) == 1
    assert "nothing.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "empty_tb").mkdir()
    assert plot_metrics.main([str(tmp_path / "empty_tb"), "--output", str(out)]) == 1
    assert "holds no training metrics" in capsys.readouterr().err
    assert not out.exists()
