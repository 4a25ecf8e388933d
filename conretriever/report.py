"""Side-by-side tables of evaluation runs: ``conretriever compare base=DIR trained=DIR``.

Each DIR is an ``--output-dir`` of ``conretriever eval`` (one ``<task>.json`` per task). The
table has one row per task, one column per run for each metric, and the change from the first
run to the last: the "did training help" view the demo prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("nDCG@10", "ndcg_at_10"), ("R@10", "recall_at_10"), ("MRR@10", "mrr_at_10"))


def load_results(folder: str | Path) -> dict[str, dict]:
    """task -> metrics, from an eval output folder."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.name == "settings.json":
            continue
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "metrics" in record:
            out[record.get("task", path.stem)] = record["metrics"]
    if not out:
        raise FileNotFoundError(f"{folder}: no evaluation results (<task>.json) found")
    return out


def compare_table(runs: list[tuple[str, dict[str, dict]]]) -> str:
    """Markdown: task | <metric> per run ... | delta (last - first) of nDCG@10, scores x100."""
    names = [n for n, _ in runs]
    header = ["task"] + [f"{m} {n}" for m, _ in METRICS for n in names]
    if len(runs) > 1:
        header.append(f"nDCG@10 {names[-1]} - {names[0]}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tasks = sorted({t for _, res in runs for t in res})
    for task in tasks:
        cells = [task]
        for _, key in METRICS:
            for _, res in runs:
                value = res.get(task, {}).get(key)
                cells.append("-" if value is None else f"{100 * value:.2f}")
        if len(runs) > 1:
            first = runs[0][1].get(task, {}).get("ndcg_at_10")
            last = runs[-1][1].get(task, {}).get("ndcg_at_10")
            delta = None if first is None or last is None else 100 * (last - first)
            cells.append("-" if delta is None else f"{delta:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="conretriever compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="NAME=DIR (or DIR) of conretriever eval outputs")
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        name, _, folder = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
        runs.append((name, load_results(folder)))
    table = compare_table(runs)
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0
