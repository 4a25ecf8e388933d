"""Pictures of runs: training and evaluation curves, and per-task comparison bars (PNG).

``conretriever report RUN_DIR [RUN_DIR ...] --output report/`` reads each run folder's
``metrics.jsonl`` and draws, with the runs overlaid (one colour each, named by folder):

* ``training.png``: loss, in-batch accuracy, learning rate, gradient norm (before clipping) and
  real tokens/s against the step;
* ``evaluation.png``: the scores logged during training (``eval/<task>/<metric>``), nDCG@10
  per eval task and their average, against the step (only when a run evaluated).

``conretriever compare ... --plot bars.png`` draws nDCG@10 per task with one bar per run.
matplotlib's file-only backend (Agg) is used, so no screen is needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import DataError
from conretriever.files import output_folder, writing
from conretriever.options import opt, output_opt

TRAIN_PANELS = (
    ("loss", "loss (InfoNCE)", False),
    ("accuracy", "in-batch accuracy", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("tokens_per_s", "real tokens / s", False),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; chosen here, not at import
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a run folder's ``metrics.jsonl``."""
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{run}: no metrics.jsonl (not a training run folder?)")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not JSON") from None
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return train, evals


def training_curves(runs: dict[str, list[dict]], out: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(len(TRAIN_PANELS), 1, figsize=(8, 2.3 * len(TRAIN_PANELS)),
                             sharex=True)  # fmt: skip
    for ax, (key, title, log) in zip(axes, TRAIN_PANELS, strict=True):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 40 else None,
                        label=name)  # fmt: skip
        ax.set_ylabel(title, fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle("training", fontsize=10)
    fig.tight_layout()
    _save(fig, Path(out))
    plt.close(fig)
    return out


def evaluation_curves(runs: dict[str, list[dict]], out: Path, metric: str = "ndcg_at_10") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, rows in runs.items():
        keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith(metric)})
        if len(keys) == 2:  # one task: its "average" is the same curve drawn twice
            keys = [k for k in keys if k.split("/")[1] != "average"]
        for key in keys:
            task = key.split("/")[1]
            points = [(r["step"], 100 * r[key]) for r in rows if r.get(key) is not None]
            style = "-" if task == "average" else "--"
            ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{name}: {task}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric} x100 (eval during training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(out))
    plt.close(fig)
    return out


def compare_bars(runs: list[tuple[str, dict[str, dict]]], out: Path) -> Path:
    """nDCG@10 x100 per task, one bar per run (``conretriever compare --plot``)."""
    plt = _pyplot()
    tasks = sorted({t for _, res in runs for t in res})
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * len(runs) / 2), 4))
    for i, (name, res) in enumerate(runs):
        xs = [j + i * width for j in range(len(tasks))]
        ys = [100 * res.get(t, {}).get("ndcg_at_10", 0.0) for t in tasks]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("nDCG@10 x100")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _save(fig, Path(out))
    plt.close(fig)
    return Path(out)


@dataclass
class ReportSettings:
    """``conretriever report RUN_DIR [RUN_DIR ...] --output report/``."""

    runs: list[Path] = opt(default_factory=list, positional=True, required=True,
                           metavar="RUN_DIR", help="training run folders (overlaid)")  # fmt: skip
    output: Path = output_opt(Path("report"), help="folder for training.png and evaluation.png")


def _save(fig, out: Path) -> None:
    """The PNG written aside and renamed: a full disk keeps the old plot, not half a new one."""
    tmp = out.with_name(f".{out.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run(settings: ReportSettings) -> int:
    output_folder(settings.output, "--output")  # before reading the runs
    names: dict[str, Path] = {}
    for path in settings.runs:
        name = path.resolve().name
        names[name if name not in names else str(path)] = path
    train, evals = {}, {}
    for name, path in names.items():
        train[name], evals[name] = read_metrics(path)
    with writing(settings.output, "--output"):
        settings.output.mkdir(parents=True, exist_ok=True)
        written = [training_curves(train, settings.output / "training.png")]
        if any(evals.values()):
            written.append(evaluation_curves(evals, settings.output / "evaluation.png"))
    for path in written:
        print(f"plot: {path}")
    return 0
