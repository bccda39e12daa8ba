"""Plot a DPO run's metrics (loss, rewards, accuracies, margins, lr) against iteration into one PNG.

    python tools/plot_metrics.py SAVE_DIR/metrics.jsonl --output run.png
    python tools/plot_metrics.py TENSORBOARD_DIR --output run.png

Reads the JSONL file pretrain_dpo.py writes into --save, or a --tensorboard-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PANELS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "lr"]

Series = dict[str, dict[str, list[tuple[int, float]]]]  # split -> metric -> [(iteration, value)]


def read_jsonl(path: Path) -> Series:
    series: Series = defaultdict(lambda: defaultdict(list))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise ValueError(f"{path}:{number}: expected a JSON object with an integer \"iteration\"")
        for key, value in row.items():
            if key not in ("split", "iteration") and isinstance(value, (int, float)):
                series[row.get("split", "train")][key].append((row["iteration"], float(value)))
    return series


def read_tensorboard(directory: Path) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    series: Series = defaultdict(lambda: defaultdict(list))
    for tag in accumulator.Tags()["scalars"]:
        split, _, metric = tag.partition("/")
        series[split][metric] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return series


def plot(series: Series, output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, metric in zip(axes.flat, PANELS):
        for split, style in (("train", "-"), ("valid", "o--")):
            points = series.get(split, {}).get(metric)
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, style, label=split, markersize=4)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="metrics.jsonl or a TensorBoard log directory")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"plot_metrics.py: error: {args.source} does not exist", file=sys.stderr)
        return 1
    try:
        series = read_tensorboard(args.source) if args.source.is_dir() else read_jsonl(args.source)
    except ValueError as err:
        print(f"plot_metrics.py: error: {err}", file=sys.stderr)
        return 1
    if not series.get("train"):
        print(f"plot_metrics.py: error: {args.source} holds no training metrics", file=sys.stderr)
        return 1
    plot(series, args.output, args.title or str(args.source))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
