"""Training objectives on a CPU budget: does Matryoshka keep short vectors good, and do mined +
distilled negatives beat BM25 ones? Zero-shot SciFact nDCG@10 after training Gemma-3-270M on
SQuAD (configs/squad_gemma_cpu.yaml, at most the quality benchmark's budget per run).

    python benchmarks/objectives.py                  # 3 runs x 60 steps + 3 SciFact encodes
    python benchmarks/objectives.py --max_steps 30   # any training flag applies to every run
    python benchmarks/objectives.py --max_steps 30 --reuse   # finish an interrupted invocation

Runs, all with the same steps, batch, learning rate and seed:

1. **bm25**: SQuAD with its BM25 hard negatives (the quality benchmark's data);
2. **matryoshka**: the same, plus ``--matryoshka_dims 128 256``;
3. **mined + distilled**: negatives mined with all-MiniLM-L6-v2 (``conretriever mine
   --output_scores --max_score_ratio 0.95 --min_negatives 1``: ranks 2-30 of the paragraphs,
   positive-aware; rows left with no negative are left out, as distillation needs one), and
   MiniLM's scores distilled (``--distil_weight 1``) next to InfoNCE.

Each trained model is evaluated on SciFact at its full 640 dimensions and truncated to 256 and
128 (one corpus encoding per model: the store keeps full vectors). A block is appended to
``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIMS = (0, 256, 128)  # 0: full


def evaluate(final: str, scifact: Path, cache: Path) -> dict[int, float]:
    from conretriever.evaluation.evaluate import evaluate_beir_dir
    from conretriever.model.embedder import Embedder

    scores = {}
    for dim in DIMS:
        model = Embedder.from_pretrained(final, {"truncate_dim": dim})
        metrics = evaluate_beir_dir(model, scifact, cache_dir=cache, show_progress=True)
        scores[dim] = 100 * metrics["ndcg_at_10"]
        print(f"{final} @ {dim or 'full'}: nDCG@10 {scores[dim]:.2f}", flush=True)
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-dir", default=str(REPO.parent / "shared" / "data" / "scifact"))
    parser.add_argument("--work", default=str(REPO / "outputs" / "objectives"))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results.md"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip training a run whose folder already holds final/ from an earlier invocation "
        "with the same flags (its train time is then the sum of step_s in its metrics.jsonl)",
    )
    args, flags = parser.parse_known_args()
    os.chdir(REPO)
    scifact, work = Path(args.eval_dir), Path(args.work)
    squad = REPO.parent / "shared" / "data" / "train" / "squad.jsonl.gz"
    if not scifact.exists() or not squad.exists():
        print("needs ../shared/data (scifact, train/squad.jsonl.gz)", file=sys.stderr)
        return 2
    from conretriever.cli import main as cli

    flags = flags or ["--max_steps", "60"]
    mined = work / "mined"
    tic = time.perf_counter()
    if not (mined / "squad.jsonl").exists():
        mined.mkdir(parents=True, exist_ok=True)
        code = cli(["mine", "--model", "embedded:minilm", "--data", str(squad), "--corpus", "self",
                    "--output", str(mined / "squad.jsonl"), "--window", "2-30",
                    "--n_negatives", "3", "--output_scores", "--max_score_ratio", "0.95",
                    "--min_negatives", "1", "--no_progress",
                    "--report", str(work / "mine_report.json"), "--overwrite"])  # fmt: skip
        if code:
            return code
    mine_s = time.perf_counter() - tic
    report = work / "mine_report.json"
    if mine_s < 1 and report.exists():  # mined by an earlier invocation: its own timing
        mine_s = sum(json.loads(report.read_text()).get("seconds", {}).values())
    runs = {
        "bm25": [],
        "matryoshka": ["--matryoshka_dims", "128", "256"],
        "mined + distilled": ["--train_data", str(mined), "--distil_weight", "1.0"],
    }
    table, times = {}, {}
    for name, extra in runs.items():
        out = work / name.replace(" ", "").replace("+", "_")
        tic = time.perf_counter()
        base = [
            "train",
            "--config",
            "configs/squad_gemma_cpu.yaml",
            "--output",
            str(out),
            "--overwrite_output_dir",
            "true",
            "--save_steps",
            "0",
            "--report_to",
            "none",
        ]
        if args.reuse and (out / "final").is_dir():
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train_s = sum(row.get("step_s", 0.0) for row in steps if "step_s" in row)
            print(f"--reuse: {out / 'final'} ({len(steps)} logged steps, {train_s:.0f} s)")
        else:
            if cli([*base, *extra, *flags]):
                return 1
            train_s = time.perf_counter() - tic
        tic = time.perf_counter()
        scores_file = out / "objectives_scifact.json"  # {dim: nDCG@10, "eval_s": seconds}
        if args.reuse and scores_file.exists():
            saved = json.loads(scores_file.read_text())
            table[name] = {int(d): v for d, v in saved.items() if d != "eval_s"}
            times[name] = (train_s, saved["eval_s"])
            continue
        table[name] = evaluate(str(out / "final"), scifact, work / "cache")
        times[name] = (train_s, time.perf_counter() - tic)
        scores_file.write_text(json.dumps({**table[name], "eval_s": times[name][1]}) + "\n")
    import torch

    lines = [
        f"\n## objectives: SciFact nDCG@10 after SQuAD training ({time.strftime('%Y-%m-%d')})",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({torch.backends.cpu.get_cpu_capability()}), no GPU; command: "
        f"`python benchmarks/objectives.py {' '.join(sys.argv[1:])}`; training flags "
        f"{' '.join(flags)} on configs/squad_gemma_cpu.yaml; mining {mine_s / 60:.1f} min",
        "",
        "| training | nDCG@10 full (640) | @256 | @128 | train min | eval min |",
        "|---|---|---|---|---|---|",
    ]
    for name, scores in table.items():
        cells = " | ".join(f"{scores[d]:.2f}" for d in DIMS)
        train_min, eval_min = times[name][0] / 60, times[name][1] / 60
        lines.append(f"| {name} | {cells} | {train_min:.1f} | {eval_min:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as handle:
        handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
