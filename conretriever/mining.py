"""Hard-negative mining: retrieve with any Embedder, take negatives from a window of ranks.

Contrastive training learns most from negatives the model finds hard; E5 and its successors mine
them with a retriever. For each training row:

1. the query is encoded as a query (``role="query"``) with the row's own instruction, else the
   task's registry instruction (the task is the file name, as in training); the corpus is
   encoded once as passages through ``search.encode_corpus`` (disk cache keyed by model and
   text, so mining again with the same model, or evaluating it on the same corpus, is free);
2. ``search.exact_search`` ranks the corpus; candidates are the documents at 1-based ranks
   ``window = (lo, hi)`` inclusive (default 30-100). The top ranks are skipped on purpose: in
   sparsely judged data (MS MARCO, SciFact) many top documents are relevant but unlabelled, and
   training on such false negatives hurts more than easy negatives do (the window of FlagEmbedding's
   ``hn_mine`` and of the NV-Retriever study);
3. a candidate is dropped if it is a positive of the row or the query itself after text
   normalisation (lower-case, no punctuation, collapsed spaces), or a near-duplicate of a
   positive: passage-passage cosine above ``dedup_threshold`` (default 0.95). Normalisation
   catches re-formatted copies; the cosine catches copies that differ by more than formatting
   (a truncated or re-scraped passage, a title added) which any embedder places almost on top of
   the original, while distinct passages on the same topic rarely come that close (the mining
   report counts the non-positive candidates at or above cosine 0.90 / 0.95 / 0.98 and gives
   the highest, to check the choice on real data);
4. ``n_negatives`` of the remaining candidates are drawn at random (seeded per row; ``--pick
   top`` takes the best-ranked instead) and written in rank order into ``negative``.

The corpus is a BEIR ``corpus.jsonl`` (title and text joined by a space, as the BEIR converter
writes positives, so a positive found in the corpus is recognised exactly), a folder holding one
(or several ``*.jsonl`` corpus files), or ``self``: the union of all positives and negatives of
the training file. The output is written to a temporary file and renamed, with a JSON report.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conretriever.data import (
    DataError,
    Example,
    _open_text,
    atomic_files,
    read_task_file,
    task_name,
)
from conretriever.decontam import normalize_text
from conretriever.progress import track
from conretriever.tasks import TaskRegistry

NEAR_THRESHOLD_BANDS = (0.9, 0.95, 0.98)  # report how many candidates sit above each


@dataclass
class MineSettings:
    model: str  # any spec conretriever.models understands (hub id, dir, gguf, embedded:...)
    data: Path  # training task file (.jsonl / .jsonl.gz)
    corpus: str  # corpus.jsonl, a folder, or "self"
    out: Path
    window: tuple[int, int] = (30, 100)  # 1-based ranks, inclusive
    n_negatives: int = 7  # e5-mistral trained with 1 hard negative per query; 7 leaves choice
    dedup_threshold: float = 0.95  # passage-passage cosine; see module docstring
    pick: str = "random"  # random | top
    seed: int = 42
    task: str | None = None  # default: the data file's name
    instruction: str | None = None  # overrides rows and registry
    batch_size: int = 256
    max_length: int | None = None  # passage tokens; None = the embedder's doc_max_length
    cache_dir: Path | None = None  # embedding cache (search.encode_corpus)
    show_progress: bool = True


@dataclass
class MineReport:
    rows: int = 0
    corpus_docs: int = 0
    candidates: int = 0  # window slots looked at
    dropped_positive: int = 0  # normalised text equal to a positive (or to the query)
    dropped_near_duplicate: int = 0  # cosine to a positive above the threshold
    negatives_written: int = 0
    rows_short: int = 0  # rows that got fewer than n_negatives
    per_row: dict[int, int] = field(default_factory=dict)  # negatives per row -> rows
    near_cosine_counts: dict[str, int] = field(default_factory=dict)  # non-positive candidates
    max_cosine_to_positive: float = -1.0  # over candidates that are not positives
    seconds: dict[str, float] = field(default_factory=dict)


def parse_window(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"--window {text!r}: expected LO-HI, e.g. 30-100") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"--window {text!r}: need 1 <= LO <= HI")
    return lo, hi


# --- corpus -------------------------------------------------------------------------------------


def _read_corpus_file(path: Path) -> list[str]:
    docs = []
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field 'text': missing or not a string")
            docs.append(f"{row.get('title') or ''} {text}".strip())
    return docs


def load_corpus(spec: str, examples: list[Example]) -> list[str]:
    """Distinct corpus texts in first-seen order (see the module docstring for ``spec``)."""
    if spec == "self":
        texts = [t for ex in examples for t in (*ex.positives, *ex.negatives)]
    else:
        path = Path(spec)
        if path.is_dir():
            files = (
                [path / "corpus.jsonl"]
                if (path / "corpus.jsonl").exists()
                else sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
            )
            if not files:
                raise DataError(f"{path}: no corpus.jsonl or *.jsonl files")
        elif path.exists():
            files = [path]
        else:
            raise DataError(f"{spec}: corpus not found (a corpus.jsonl, a folder, or 'self')")
        texts = [t for f in files for t in _read_corpus_file(f)]
    return list(dict.fromkeys(t for t in texts if t.strip()))


# --- mining -------------------------------------------------------------------------------------


def _query_vectors(embedder, examples, settings, registry, task) -> np.ndarray:
    """Encode queries grouped by instruction (one encode call per distinct instruction)."""
    groups: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        inst = settings.instruction or ex.instruction or registry.instruction(task)
        groups.setdefault(inst, []).append(i)
    out = np.zeros((len(examples), 0), np.float32)
    for inst, rows in groups.items():
        emb = embedder.encode(
            [examples[i].query for i in rows],
            role="query",
            instruction=inst,
            batch_size=settings.batch_size,
            show_progress=settings.show_progress,
        )
        if out.shape[1] == 0:
            out = np.zeros((len(examples), emb.shape[1]), np.float32)
        out[rows] = emb
    return out


def mine(settings: MineSettings, embedder=None, registry: TaskRegistry | None = None) -> MineReport:
    """Mine negatives for ``settings.data`` and write ``settings.out``; see module docstring."""
    from conretriever.search import encode_corpus, exact_search

    timer = time.perf_counter()
    report = MineReport()
    registry = registry or TaskRegistry.load()
    task = settings.task or task_name(settings.data)
    examples = read_task_file(settings.data, task)
    corpus = load_corpus(settings.corpus, examples)
    if not corpus:
        raise DataError(f"{settings.corpus}: empty corpus")
    report.rows, report.corpus_docs = len(examples), len(corpus)
    if embedder is None:
        from conretriever.modeling import Embedder

        embedder = Embedder.from_pretrained(settings.model)
    report.seconds["load"] = round(time.perf_counter() - timer, 2)

    timer = time.perf_counter()
    encode = dict(
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        cache_dir=settings.cache_dir,
        show_progress=settings.show_progress,
    )
    doc_emb = encode_corpus(embedder, corpus, **encode)
    # Positives absent from the corpus still need vectors for the near-duplicate test.
    doc_index = {t: i for i, t in enumerate(corpus)}
    extra = list(dict.fromkeys(p for ex in examples for p in ex.positives if p not in doc_index))
    extra_emb = encode_corpus(embedder, extra, **encode) if extra else doc_emb[:0]
    extra_index = {t: i for i, t in enumerate(extra)}
    report.seconds["encode_corpus"] = round(time.perf_counter() - timer, 2)

    timer = time.perf_counter()
    q_emb = _query_vectors(embedder, examples, settings, registry, task)
    report.seconds["encode_queries"] = round(time.perf_counter() - timer, 2)

    timer = time.perf_counter()
    lo, hi = settings.window
    _, ranked = exact_search(q_emb, doc_emb, hi)
    report.seconds["search"] = round(time.perf_counter() - timer, 2)

    timer = time.perf_counter()
    normalized = [normalize_text(t) for t in corpus]
    bands = dict.fromkeys(NEAR_THRESHOLD_BANDS, 0)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_files() as stage:
        with open(stage(settings.out), "w", encoding="utf-8") as handle:
            rows = track(examples, "mine", enabled=settings.show_progress, unit="rows")
            for i, ex in enumerate(rows):
                blocked = {normalize_text(p) for p in ex.positives} | {normalize_text(ex.query)}
                pos_emb = np.stack(
                    [
                        doc_emb[doc_index[p]] if p in doc_index else extra_emb[extra_index[p]]
                        for p in ex.positives
                    ]
                )
                window = ranked[i, lo - 1 : hi]
                cosine = (doc_emb[window] @ pos_emb.T).max(axis=1) if len(window) else []
                kept = []
                for doc, cos in zip(window.tolist(), cosine, strict=True):
                    report.candidates += 1
                    if normalized[doc] in blocked:
                        report.dropped_positive += 1
                        continue
                    for band in NEAR_THRESHOLD_BANDS:  # among candidates that are not positives
                        bands[band] += int(cos >= band)
                    report.max_cosine_to_positive = max(report.max_cosine_to_positive, float(cos))
                    if cos > settings.dedup_threshold:
                        report.dropped_near_duplicate += 1
                    else:
                        kept.append(doc)
                if settings.pick == "top" or len(kept) <= settings.n_negatives:
                    chosen = kept[: settings.n_negatives]
                else:
                    rng = random.Random(f"{settings.seed}:{i}")
                    picked = set(rng.sample(range(len(kept)), settings.n_negatives))
                    chosen = [d for k, d in enumerate(kept) if k in picked]  # rank order
                row = {"query": ex.query, "positive": list(ex.positives)}
                row["negative"] = [corpus[d] for d in chosen]
                if ex.instruction:
                    row["instruction"] = ex.instruction
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                report.negatives_written += len(chosen)
                report.rows_short += int(len(chosen) < settings.n_negatives)
                report.per_row[len(chosen)] = report.per_row.get(len(chosen), 0) + 1
    report.near_cosine_counts = {f">={b}": n for b, n in bands.items()}
    report.per_row = dict(sorted(report.per_row.items()))
    report.seconds["select_and_write"] = round(time.perf_counter() - timer, 2)
    return report


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conretriever mine", description="Mine hard negatives with any Embedder."
    )
    p.add_argument("--model", required=True, help="model spec (dir, hub id, embedded:minilm)")
    p.add_argument("--data", required=True, type=Path, help="training task file")
    p.add_argument("--corpus", required=True, help="corpus.jsonl, a folder, or 'self'")
    p.add_argument("--out", required=True, type=Path, help="output training file")
    p.add_argument("--window", default="30-100", help="1-based ranks LO-HI (inclusive)")
    p.add_argument("--n-negatives", type=int, default=7)
    p.add_argument("--dedup-threshold", type=float, default=0.95)
    p.add_argument("--pick", choices=("random", "top"), default="random")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--task", help="task name for the registry instruction (default: file name)")
    p.add_argument("--instruction", help="query instruction for every row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int)
    p.add_argument("--cache-dir", type=Path, help="embedding cache folder")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        window = parse_window(args.window)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = MineSettings(
        model=args.model,
        data=args.data,
        corpus=args.corpus,
        out=args.out,
        window=window,
        n_negatives=args.n_negatives,
        dedup_threshold=args.dedup_threshold,
        pick=args.pick,
        seed=args.seed,
        task=args.task,
        instruction=args.instruction,
        batch_size=args.batch_size,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
        show_progress=not args.no_progress,
    )
    try:
        report = mine(settings)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = json.dumps(report.__dict__, indent=2)
    if args.report:
        args.report.write_text(text + "\n")
    print(text)
    print(
        f"{settings.out}: {report.rows} rows, {report.negatives_written} negatives "
        f"({report.rows_short} rows short of {settings.n_negatives}); of {report.candidates} "
        f"window candidates dropped {report.dropped_positive} as positives and "
        f"{report.dropped_near_duplicate} as near-duplicates"
    )
    return 0


def decontaminate_main(argv: list[str] | None = None) -> int:
    """``conretriever decontaminate``: see :mod:`conretriever.decontam`."""
    from conretriever.decontam import main as decontam_main

    return decontam_main(argv)
