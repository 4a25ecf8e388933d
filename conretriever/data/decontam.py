"""Decontamination: which training rows overlap the evaluation sets we will report?

A retriever that saw an evaluation query, or the document that answers it, during training
reports a score it did not earn. For each evaluation BEIR folder we take the queries of one qrels
split (``test`` by default; ``queries.jsonl`` also holds train queries, which are not evaluation
data) and their relevant documents (score > 0, title and text joined by a space), and compare
every training row's query and positives (``--fields``) with them in three ways, strongest first:

1. ``exact``: the two strings are identical;
2. ``normalized``: identical after lower-casing, replacing punctuation by spaces and collapsing
   whitespace (catches re-cased, re-punctuated or re-spaced copies);
3. ``ngram``: the texts share word n-grams of the normalised text (default n = 13, the GPT-3
   decontamination rule: one shared 13-gram flags a row; Llama-2 used a fraction-of-tokens rule,
   which ``--min-ngram-fraction`` approximates as the share of the training text's n-grams that
   occur in the evaluation data). Texts shorter than n words have no n-grams; only rules 1-2
   apply to them, since short questions collide by chance far more often than long passages.

A row is counted once, under the strongest rule any of its fields met. The report (JSON) gives
counts per rule, per training field and per evaluation side (query or document), plus examples;
``--drop --output`` also writes the training data without the flagged rows (lines copied verbatim).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from conretriever.data.training import parse_row, task_name
from conretriever.errors import ConfigError, DataError
from conretriever.files import (
    atomic_files,
    json_line,
    open_text,
    output_file,
    output_folder,
    refuse_existing,
    write_text,
    writing,
)
from conretriever.options import opt, output_opt, to_dict

KINDS = ("exact", "normalized", "ngram")
_PUNCT = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """Lower-case, punctuation -> space, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ngram_hashes(normalized: str, n: int) -> set[int]:
    words = normalized.split()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


@dataclass
class DecontamSettings:
    """``conretriever decontaminate`` flags (and the Python API's settings)."""

    eval_dirs: list[Path] = opt(
        default_factory=list, aliases=("eval_dir",), help="evaluation BEIR folders"
    )
    data: list[Path] = opt(default_factory=list, help="training files or folders of task files")
    eval_split: str = opt("test", help="qrels split whose queries are evaluation data")
    fields: list[str] = opt(
        default_factory=lambda: ["query", "positive"],
        choices=("query", "positive", "negative"),
        help="training row fields compared",
    )
    ngram: int = opt(13, ge=1, help="word n-gram length (13: the GPT-3 rule)")
    min_shared_ngrams: int = opt(1, ge=1, help="shared n-grams that flag a row")
    min_ngram_fraction: float = opt(
        0.0, ge=0, le=1, help="and at least this share of the text's n-grams"
    )
    n_examples: int = opt(5, ge=0, help="examples per rule in the report")
    report: Path | None = opt(None, help="write the JSON report here")
    drop: bool = opt(False, help="write the training data without flagged rows to --output")
    output: Path | None = output_opt(None, help="with --drop: output file (a folder if several)")
    overwrite: bool = opt(False, help="replace an existing --output / --report")
    allow_extra_fields: bool = opt(False, help="accept rows with unknown keys (ignored)")

    def validate(self) -> None:
        if not self.eval_dirs:
            raise ConfigError("--eval_dirs is required (the evaluation BEIR folders)")
        if not self.data:
            raise ConfigError("--data is required (training files or folders)")
        if self.drop and self.output is None:
            raise ConfigError("--drop needs --output")


@dataclass
class EvalIndex:
    """Every evaluation text under the three rules; values say where it came from."""

    # text (or n-gram hash) -> (side, label): side is "query" or "document"
    exact: dict[str, tuple[str, str]] = field(default_factory=dict)
    normalized: dict[str, tuple[str, str]] = field(default_factory=dict)
    ngrams: dict[int, tuple[str, str]] = field(default_factory=dict)
    n_queries: int = 0
    n_docs: int = 0

    def add(self, text: str, side: str, label: str, n: int) -> None:
        norm = normalize_text(text)
        self.exact.setdefault(text, (side, label))
        self.normalized.setdefault(norm, (side, label))
        for h in ngram_hashes(norm, n):
            self.ngrams.setdefault(h, (side, label))

    @classmethod
    def build(cls, eval_dirs: list[Path], split: str, n: int) -> EvalIndex:
        from conretriever.data.beir import judged_queries

        index = cls()
        for folder in eval_dirs:
            docs_seen: set[str] = set()
            for where, row in judged_queries(Path(folder), split):
                index.add(row["query"], "query", f"{folder.name} query ({where})", n)
                index.n_queries += 1
                for doc in row["positive"]:
                    if doc not in docs_seen:
                        docs_seen.add(doc)
                        index.add(
                            doc, "document", f"{folder.name} document (relevant to {where})", n
                        )
            index.n_docs += len(docs_seen)
        return index

    def match(self, text: str, settings: DecontamSettings) -> tuple[str, tuple, int] | None:
        """(rule, (side, label), shared n-grams) of the strongest match, or None."""
        if text in self.exact:
            return "exact", self.exact[text], 0
        norm = normalize_text(text)
        if norm in self.normalized:
            return "normalized", self.normalized[norm], 0
        grams = ngram_hashes(norm, settings.ngram)
        shared = [h for h in grams if h in self.ngrams]
        if (
            shared
            and len(shared) >= settings.min_shared_ngrams
            and len(shared) / len(grams) >= settings.min_ngram_fraction
        ):
            return "ngram", self.ngrams[shared[0]], len(shared)
        return None


def _training_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(x for x in p.iterdir() if x.name.endswith((".jsonl", ".jsonl.gz")))
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: training data not found")
    return files


@dataclass
class _Tally:
    """What the scan found, rule by rule (the report's numbers)."""

    fields: list[str]
    rows: int = 0
    counts: dict = field(default_factory=lambda: {k: 0 for k in KINDS})
    by_field: dict = field(default_factory=dict)
    by_side: dict = field(default_factory=lambda: {"query": 0, "document": 0})
    examples: dict = field(default_factory=lambda: {k: [] for k in KINDS})

    def __post_init__(self):
        self.by_field = {f: {k: 0 for k in KINDS} for f in self.fields}

    def add(self, where: str, hit, n_examples: int) -> None:
        kind, fld, text, (side, label), shared = hit
        self.counts[kind] += 1
        self.by_field[fld][kind] += 1
        self.by_side[side] += 1
        if len(self.examples[kind]) < n_examples:
            self.examples[kind].append(
                {"train": where, "field": fld, "text": text[:200], "eval": label,
                 "shared_ngrams": shared}
            )  # fmt: skip


def _scan_file(path: Path, index: EvalIndex, settings: DecontamSettings, tally: _Tally, writer):
    """Check every row of one training file; copy the clean lines to ``writer`` (if any)."""
    with open_text(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            errors: list[str] = []
            row = json_line(where, line)
            ex = parse_row(row, where, task_name(path), errors, settings.allow_extra_fields)
            if ex is None:
                raise DataError("\n".join(errors))
            tally.rows += 1
            hit = _row_match(ex, index, settings)
            if hit is not None:
                tally.add(where, hit, settings.n_examples)
            elif writer is not None:
                writer.write(line if line.endswith("\n") else line + "\n")


def decontaminate(settings: DecontamSettings, drop_out: Path | None = None) -> dict:
    """Scan the training data; return the report; with ``drop_out`` write the clean rows."""
    start = time.perf_counter()
    index = EvalIndex.build(settings.eval_dirs, settings.eval_split, settings.ngram)
    files = _training_files(settings.data)
    tally = _Tally(list(settings.fields))
    with atomic_files() as stage:
        for path in files:
            if drop_out is None:
                _scan_file(path, index, settings, tally, None)
                continue
            final = drop_out / path.name if len(files) > 1 else drop_out
            with writing(drop_out, "--output"):
                final.parent.mkdir(parents=True, exist_ok=True)
                writer = open(stage(final), "w", encoding="utf-8")  # noqa: SIM115
            # the training files were listed just before, so an OSError here is the output's
            with writer, writing(drop_out, "--output"):
                _scan_file(path, index, settings, tally, writer)
    flagged = sum(tally.counts.values())
    return {
        "settings": to_dict(settings),
        "eval": {"queries": index.n_queries, "documents": index.n_docs},
        "training_rows": tally.rows,
        "flagged_rows": flagged,
        "kept_rows": tally.rows - flagged,
        "by_kind": tally.counts,
        "by_field": tally.by_field,
        "by_eval_side": tally.by_side,
        "examples": tally.examples,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _row_match(ex, index: EvalIndex, settings: DecontamSettings):
    """Strongest match over the row's checked fields: (kind, field, text, label, shared)."""
    best = None
    for fld in settings.fields:
        texts = {"query": [ex.query], "positive": ex.positives, "negative": ex.negatives}[fld]
        for text in texts:
            m = index.match(text, settings)
            if m and (best is None or KINDS.index(m[0]) < KINDS.index(best[0])):
                best = (m[0], fld, text, m[1], m[2])
                if m[0] == "exact":
                    return best
    return best


def summary(report: dict) -> str:
    lines = [
        f"evaluation: {report['eval']['queries']} queries, {report['eval']['documents']} "
        f"relevant documents",
        f"training rows: {report['training_rows']}, flagged: {report['flagged_rows']} "
        f"({100 * report['flagged_rows'] / max(1, report['training_rows']):.2f}%), "
        f"kept: {report['kept_rows']}  [{report['seconds']} s]",
        "by rule: " + ", ".join(f"{k} {v}" for k, v in report["by_kind"].items()),
        "by field: "
        + "; ".join(
            f"{f}: " + ", ".join(f"{k} {v}" for k, v in c.items())
            for f, c in report["by_field"].items()
        ),
        "matched evaluation " + ", ".join(f"{k} {v}" for k, v in report["by_eval_side"].items()),
    ]
    for kind, exs in report["examples"].items():
        for e in exs[:3]:
            lines.append(f"  [{kind}] {e['train']} {e['field']}: {e['text'][:80]!r} ~ {e['eval']}")
    return "\n".join(lines)


def run(settings: DecontamSettings) -> int:
    """``conretriever decontaminate``."""
    outputs = [p for p in (settings.report, settings.output if settings.drop else None) if p]
    if settings.report:
        output_file(settings.report, "--report")
    if settings.drop and settings.output:
        # one file out (a single training file) or a folder of them: check where it goes
        output_folder(
            settings.output.parent if settings.output.suffix else settings.output, "--output"
        )
    refuse_existing(outputs, settings.overwrite)
    report = decontaminate(settings, settings.output if settings.drop else None)
    if settings.report:
        with writing(settings.report, "--report"):
            write_text(settings.report, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(summary(report))
    return 0
