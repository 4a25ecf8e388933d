"""Side-by-side tables of evaluation runs: ``conretriever compare base=DIR trained=DIR``.

Each DIR is an ``--output`` of ``conretriever eval`` (one ``<task>.json`` per task). The
table has one row per task and run, and each run's nDCG@10 change from the first run: the "did
training help" view the demo prints (untrained, trained, and a reference model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import DataError
from conretriever.files import output_file, read_json, write_text, writing
from conretriever.options import opt, output_opt

METRICS = (("nDCG@10", "ndcg_at_10"), ("R@10", "recall_at_10"), ("MRR@10", "mrr_at_10"))


def load_results(folder: str | Path) -> dict[str, dict]:
    """task -> metrics, from an eval output folder."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.name == "settings.json":
            continue
        record = read_json(path)
        if isinstance(record, dict) and "metrics" in record:
            out[record.get("task", path.stem)] = record["metrics"]
    if not out:
        raise DataError(f"{folder}: no evaluation results (<task>.json) found")
    return out


def compare_table(runs: list[tuple[str, dict[str, dict]]]) -> str:
    """Markdown, one row per (task, run), scores x100; the last column is each run's nDCG@10
    change from the first run's (the "did training help" view the demo prints)."""
    header = ["task", "model"] + [m for m, _ in METRICS]
    if len(runs) > 1:
        header.append(f"nDCG@10 vs {runs[0][0]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = sorted({t for _, res in runs for t in res})
    for task in tasks:
        first = runs[0][1].get(task, {}).get("ndcg_at_10")
        for index, (name, res) in enumerate(runs):
            metrics = res.get(task, {})
            cells = [task, name]
            for _, key in METRICS:
                value = metrics.get(key)
                cells.append("-" if value is None else f"{100 * value:.2f}")
            if len(runs) > 1:
                value = metrics.get("ndcg_at_10")
                if index == 0 or first is None or value is None:
                    cells.append("")
                else:
                    cells.append(f"{100 * (value - first):+.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class CompareSettings:
    """``conretriever compare NAME=DIR ...``."""

    runs: list[str] = opt(
        default_factory=list,
        positional=True,
        required=True,
        metavar="NAME=DIR",
        # a run's NAME is free text ("lr 1e-4, 2 epochs"); a wrong DIR fails as a folder
        # without results, naming it, so a comma cannot pass unnoticed
        commas="keep",
        help="conretriever eval output folders, optionally named (DIR alone: its folder name)",
    )
    output: Path | None = output_opt(None, help="also write the table to this markdown file")
    plot: Path | None = opt(None, help="also draw nDCG@10 per task and run as a bar chart (PNG)")


def run(settings: CompareSettings) -> int:
    for path, flag in ((settings.output, "--output"), (settings.plot, "--plot")):
        if path:
            output_file(path, flag)
    runs = []
    for item in settings.runs:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        runs.append((name, load_results(folder)))
    table = compare_table(runs)
    print(table)
    if settings.output:
        with writing(settings.output, "--output"):
            write_text(settings.output, table)  # a full disk keeps the old table
    if settings.plot:
        from conretriever.evaluation.plots import compare_bars

        with writing(settings.plot, "--plot"):
            print(f"plot: {compare_bars(runs, settings.plot)}")
    return 0
