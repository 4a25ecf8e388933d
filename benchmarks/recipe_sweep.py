"""Choose the CPU recipe fast: many candidate recipes trained and scored side by side, in parallel.

    python benchmarks/recipe_sweep.py --jobs 8 --deadline_s 480 \\
        --train_flags "--dtype float32 --mixed_precision no" --eval_flags "--dtype float32"

A row of ``benchmarks/recipe.py`` costs ~30 minutes of training and 5-25 minutes of evaluation
on 2 CPU cores, so the CPU can compare a handful of recipes a day. The training maths does not
depend on the device: the same config, seed, data and step count in float32 give the same model
up to rounding on a GPU, where a 270M model leaves most of the card idle. This script trains
every candidate below on the same data and step budget as the CPU recipe (``--steps``, default
80: the 30-minute budget on a 2-core Intel Xeon with AMX), ``--jobs`` at a time, and scores
each on zero-shot SciFact (all 5,183 abstracts, 300 test queries) with documents at the trained
length (128 tokens) and at 512, at full and 256 dimensions. Rows that change the cost of a step
(more negatives, a bigger batch, longer documents) change the step count to keep the tokens
trained on, so the CPU minutes, equal.

Stage 1 adds one change at a time to the base (the shipped config, ``A``); stage 2 stacks the
changes that beat ``A``, best first. Each finished row is printed and appended to
``<work>/sweep.jsonl``, the head and tail of its logs to ``<work>/logs.txt`` (both copied to
``$OUT`` where set, so a device run that is cut short still returns what it finished and why);
the table comes last. The untrained base model is scored first: a model that loaded wrongly on
the machine shows there (a first GPU run, 2026-12-04, on the machine's own transformers 5.17,
scored every trained row ~0 nDCG@10 and returned no logs to say why; the cause is not known:
the same GGUF loads to identical weights under 5.17 and 5.24 on a CPU, and the packing tests
pass under both). It is a way to choose, not a result: the chosen recipe is then trained on the
CPU by ``benchmarks/recipe.py`` and that row is what README reports.

On an H200 with the project's own transformers 5.24, peft 0.21.2 and tokenizers 0.23.3 carried
as wheels (2026-12-04, one seed, 80 steps, float32 training, SciFact nDCG@10 with bf16
evaluation): query rows at lr 5e-4 54.00; all pairs at lr 5e-4 55.17; the same at embedding-
distillation weight 4, 57.21, which the CPU then scored 57.31 (2-core AVX2, fp32 throughout):
the device chooses as the CPU would. A second lease tried the teacher's weight further: 8
scored 57.32, 16 56.44, and the similarity matching alone (no InfoNCE, no score KL) 56.49, so
the weight is spent at 4-8. A float32 step took ~1.1 s (~4,000 tokens/s, packed; the bf16
step was not timed), so a row with its three float32 evaluations took ~4 minutes alone, and the
untrained score plus one row filled a 6-minute window: budget about 4 minutes a row when sizing
``--deadline_s``. Rows side by side on the one card lose little speed (three at once: 135 s
each for 80 float32 steps with the start, ~1.25 s a step), so run them with ``--jobs``; and one
bf16 evaluation (the default GPU path, ~27 s) costs a fraction of three float32 ones.

``--model`` / ``--teacher`` take any model spec (a GPU machine without the PyPI packages passes
the dequantised Gemma folder and a MiniLM folder); ``--mined`` is the MiniLM-mined training
folder ``benchmarks/recipe.py`` writes. ``--dry_run`` runs every row for 2 steps with a tiny
random model on ``eval_data/demo``: a check of the script itself, in a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe import CONFIG, REPO, SHARED, cli, ndcg_at_10, slug  # noqa: E402

BASE_STEPS = 80
# The base every stage-1 row changes, A, is the shipped config (all-pairs embedding distillation
# at weight 4, LoRA lr 5e-4: SciFact 57.31 on the CPU, 57.21 on an H200, 2026-12-04).
# name -> (flags on top of A, steps as a multiple of --steps: equal tokens trained on)
STAGE1: dict[str, tuple[dict[str, str], float]] = {
    "A, query rows": ({"embed_distil_rows": "queries"}, 1.0),
    "A: the shipped config": ({}, 1.0),
    "A, lr 2e-4": ({"learning_rate": "2e-4"}, 1.0),
    "A, lr 1e-3": ({"learning_rate": "1e-3"}, 1.0),
    "A, tau 0.05": ({"temperature": "0.05"}, 1.0),
    "A, embed weight 1": ({"embed_distil_weight": "1"}, 1.0),
    "A, embed weight 16": ({"embed_distil_weight": "16"}, 1.0),
    "A, teacher tau 0.05": ({"embed_distil_temperature": "0.05"}, 1.0),
    "A, distillation only": ({"contrastive_weight": "0", "distil_weight": "0"}, 1.0),
    "A, no score distillation": ({"distil_weight": "0"}, 1.0),
    "A, mean pooling": ({"pooling": "mean"}, 1.0),
    "A, bidirectional + mean": ({"bidirectional": "true", "pooling": "mean"}, 1.0),
    "A, full FT lr 2e-5": ({"use_lora": "false", "learning_rate": "2e-5"}, 1.0),
    "A, full FT lr 5e-5": ({"use_lora": "false", "learning_rate": "5e-5"}, 1.0),
    "A, LoRA r64": ({"lora_r": "64", "lora_alpha": "128"}, 1.0),
    "A, LoRA no dropout": ({"lora_dropout": "0"}, 1.0),
    "A, cosine schedule": ({"lr_scheduler": "cosine"}, 1.0),
    "A, qq + dd negatives": ({"query_query": "true", "doc_doc": "true"}, 1.0),
    "A, false-negative margin 0.1": ({"false_negative_margin": "0.1"}, 1.0),
    "A, cosine MSE": ({"embed_distil_objective": "mse"}, 1.0),
    # same tokens: 3 negatives = 80 texts a step instead of 48
    "A, 3 hard negatives": ({"n_hard_negative": "3"}, 0.6),
    "A, batch 32": ({"per_device_train_batch_size": "32"}, 0.5),
    "A, batch 8": ({"per_device_train_batch_size": "8"}, 2.0),
    # documents at 256 tokens: ~1.8x the tokens of a step
    "A, documents 256": ({"doc_max_length": "256"}, 0.55),
    # headroom: what more CPU time would buy
    "A, 2x steps": ({}, 2.0),
    "A, 4x steps": ({}, 4.0),
}
EVALS = (  # (label, eval flags, dims)
    ("doc128", [], (0, 256)),
    ("doc512", ["--doc_max_length", "512"], (0,)),
)


def flag_list(flags: dict[str, str]) -> list[str]:
    return [part for key, value in flags.items() for part in (f"--{key}", value)]


class Sweep:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.cache = self.work / "cache"
        self.results: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + args.deadline_s
        self.sweep_file = self.work / "sweep.jsonl"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, name: str, flags: dict[str, str], steps: int) -> dict | None:
        """Train one candidate and score it; None when the deadline leaves no time for it."""
        args = self.args
        # ~0.5 s a step on a shared GPU plus ~60 s of start-up and evaluation (measured by the
        # rows before it where there are any)
        done = [r for r in self.results.values() if r.get("ok")]
        per_step = max((r["train_s"] / r["steps"] for r in done), default=0.5)
        if self.left() < 60 + per_step * steps:
            print(f"skip {name}: {self.left():.0f} s left", flush=True)
            return None
        out = self.work / slug(name)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        record = {"name": name, "flags": flags, "steps": steps, "ok": False}
        try:
            tic = time.perf_counter()
            cli(["train", "--config", CONFIG, "--model_name_or_path", args.model,
                 "--train_data", args.mined, "--output", str(out / "run"),
                 "--overwrite_output_dir", "true", "--save_steps", "0", "--report_to", "none",
                 "--embed_distil_model", args.teacher, "--max_steps", str(steps),
                 *shlex.split(args.train_flags), *flag_list(flags)],
                out / "train.log")  # fmt: skip
            record["train_s"] = time.perf_counter() - tic
            tic = time.perf_counter()
            for label, extra, dims in EVALS:
                for dim in dims:
                    folder = out / f"{label}_dim{dim or 'full'}"
                    cli(["eval", "--model", str(out / "run" / "final"), "--beir_dir",
                         args.beir, "--output", str(folder), "--overwrite", "--truncate_dim",
                         str(dim), "--cache_dir", str(self.cache), "--no_progress",
                         *shlex.split(args.eval_flags), *extra],
                        folder.with_suffix(".log"))  # fmt: skip
                    record[f"{label}_dim{dim or 'full'}"] = round(ndcg_at_10(folder), 2)
            record["eval_s"] = time.perf_counter() - tic
            record["ok"] = True
        except SystemExit as err:  # cli's one-line failure with the log's tail
            record["error"] = str(err)[-1500:]
        self.keep(record)
        return record

    def keep(self, record: dict) -> None:
        with self.lock:
            self.results[record["name"]] = record
            with open(self.sweep_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if os.environ.get("OUT"):
                shutil.copy(self.sweep_file, Path(os.environ["OUT"]) / "sweep.jsonl")
        shown = {k: v for k, v in record.items() if k not in ("flags", "error")}
        print("row", json.dumps(shown), flush=True)
        if not record["ok"]:
            print(f"row {record['name']} failed:\n{record.get('error')}", flush=True)
        # what went on inside the row, where it can come back from a device machine: the head
        # of its training log (the loading report, the first steps) and its evaluations' tails
        out = self.work / slug(record["name"])
        parts = [f"===== {record['name']}"]
        for log in sorted(out.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            keep = lines[:40] + ["..."] + lines[-15:] if log.name == "train.log" else lines[-6:]
            parts += [f"--- {log.name}", *keep]
        self.note("\n".join(parts))

    def note(self, text: str) -> None:
        with self.lock:
            with open(self.work / "logs.txt", "a") as handle:
                handle.write(text + "\n")
            if os.environ.get("OUT"):
                shutil.copy(self.work / "logs.txt", Path(os.environ["OUT"]) / "logs.txt")

    def untrained(self) -> None:
        """The base model as loaded here, scored untrained (Gemma-3-270M: ~1.2 nDCG@10 on
        SciFact): a load that went wrong on this machine shows here before any training."""
        folder = self.work / "untrained"
        try:
            cli(["eval", "--model", self.args.model, "--beir_dir", self.args.beir, "--output",
                 str(folder), "--overwrite", "--cache_dir", str(self.cache), "--no_progress",
                 *shlex.split(self.args.eval_flags)], self.work / "untrained.log")  # fmt: skip
            score = ndcg_at_10(folder)
            self.note(f"===== untrained {self.args.model}: nDCG@10 {score:.2f}")
            print(f"untrained: nDCG@10 {score:.2f}", flush=True)
        except SystemExit as err:
            self.note(f"===== untrained {self.args.model}: failed\n{err}")

    def run_all(self, rows: list[tuple[str, dict, int]]) -> None:
        # longest first, so the last wave is not one long row on an idle card
        rows = sorted(rows, key=lambda r: -r[2])
        with ThreadPoolExecutor(self.args.jobs) as pool:
            list(pool.map(lambda r: self.row(*r), rows))


def score(record: dict) -> float:
    return max(record.get("doc128_dimfull", -1), record.get("doc512_dimfull", -1))


def stacked(results: dict[str, dict], steps: int) -> list[tuple[str, dict, int]]:
    """Stage 2: the stage-1 changes that beat A (equal-token rows only), stacked best first;
    a change that sets a flag an earlier one set is left out of that stack."""
    base = results.get("A: the shipped config")
    if not base or not base.get("ok"):
        return []
    gains = []
    for name, (flags, factor) in STAGE1.items():
        r = results.get(name)
        if r and r.get("ok") and flags and factor in (1.0,) and score(r) > score(base):
            gains.append((score(r) - score(base), name, flags))
    gains.sort(reverse=True)
    rows, merged, names = [], {}, []
    for _, name, flags in gains[:4]:
        if set(flags) & set(merged):
            continue
        merged, names = {**merged, **flags}, [*names, name.removeprefix("A, ")]
        if len(names) >= 2:
            rows.append(("A + " + " + ".join(names), dict(merged), steps))
    if len(gains) >= 2:  # the best pair plus headroom of the best single change
        best = gains[0]
        rows.append((f"A + {best[1].removeprefix('A, ')}, 2x steps", best[2], 2 * steps))
    return rows


def table(results: dict[str, dict]) -> str:
    lines = ["| row | steps | SciFact nDCG@10 (doc 128) | @256 dims | doc 512 | train s | "
             "eval s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    ranked = sorted(results.values(), key=lambda r: -score(r) if r.get("ok") else 1)
    for r in ranked:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {r['steps']} | failed | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['steps']} | {r['doc128_dimfull']:.2f} | "
                     f"{r['doc128_dim256']:.2f} | {r['doc512_dimfull']:.2f} | "
                     f"{r['train_s']:.0f} | {r['eval_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(REPO / "outputs" / "recipe_sweep"))
    parser.add_argument("--model", default="embedded:gemma-3-270m")
    parser.add_argument("--teacher", default="embedded:minilm")
    parser.add_argument("--mined", default=str(REPO / "outputs" / "recipe" / "mined"))
    parser.add_argument("--beir", default=str(SHARED / "scifact"))
    parser.add_argument("--steps", type=int, default=BASE_STEPS)
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once")
    parser.add_argument("--deadline_s", type=float, default=1e9, help="start no row after")
    parser.add_argument("--train_flags", default="", help="added to every training command")
    parser.add_argument("--eval_flags", default="", help="added to every evaluation command")
    parser.add_argument("--only", action="append", default=[], help="stage-1 rows to run")
    parser.add_argument("--no_stage2", action="store_true")
    parser.add_argument(
        "--no_warm",
        action="store_true",
        help="start every row at once (the teacher's vectors are in the store)",
    )
    parser.add_argument("--dry_run", action="store_true", help="tiny model, 2 steps, demo set")
    args = parser.parse_args()
    unknown = [n for n in args.only if n not in STAGE1]
    if unknown:
        print(f"recipe_sweep: unknown row {unknown[0]!r}", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.model = str(work / "tiny_model")
        if not (work / "tiny_model" / "config.json").exists():
            maker = str(REPO / "benchmarks" / "make_random_model.py")
            subprocess.run([sys.executable, maker, "--shape", "tiny-gemma", "--output",
                            args.model], check=True)  # fmt: skip
        args.beir, args.steps = str(REPO / "eval_data" / "demo"), 2
    for need in (args.mined, args.beir):
        if not Path(need).exists():
            print(f"recipe_sweep: {need} not found (run benchmarks/recipe.py once to mine the "
                  "training data; --beir: a BEIR folder)", file=sys.stderr)  # fmt: skip
            return 2
    sweep = Sweep(args)
    rows = [(name, flags, max(1, round(args.steps * factor)))
            for name, (flags, factor) in STAGE1.items()
            if not args.only or name in args.only]  # fmt: skip
    # the base alone first: it encodes the teacher's vectors into the shared store once
    first = next(r for r in rows if r[0] == "A: the shipped config") if not args.only else rows[0]
    sweep.untrained()
    if not args.no_warm:
        sweep.row(*first)
    sweep.run_all([r for r in rows if r is not first or args.no_warm])
    if not args.no_stage2:
        sweep.run_all(stacked(sweep.results, args.steps))
    text = table(sweep.results)
    print(text)
    (work / "sweep.md").write_text(text + "\n")
    if os.environ.get("OUT"):
        shutil.copy(work / "sweep.md", Path(os.environ["OUT"]) / "sweep.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
