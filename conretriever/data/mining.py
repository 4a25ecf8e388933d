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

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from conretriever.data.beir import iter_corpus
from conretriever.data.decontam import normalize_text
from conretriever.data.tasks import TaskRegistry
from conretriever.data.training import Example, read_task_file, task_name
from conretriever.errors import ConfigError, DataError
from conretriever.files import atomic_files, refuse_existing
from conretriever.options import opt
from conretriever.progress import track

NEAR_THRESHOLD_BANDS = (0.9, 0.95, 0.98)  # report how many candidates sit above each


@dataclass
class MineSettings:
    """``conretriever mine`` flags (and the Python API's settings)."""

    model: str | None = opt(None, required=True, help="model spec (dir, hub id, embedded:...)")
    data: Path | None = opt(None, required=True, help="training task file (.jsonl[.gz])")
    corpus: str | None = opt(None, required=True, help="corpus.jsonl, a folder, or 'self'")
    out: Path | None = opt(None, required=True, help="output training file")
    overwrite: bool = opt(False, help="replace an existing --out / --report")
    window: str = opt("30-100", help="1-based ranks LO-HI (inclusive) the negatives come from")
    n_negatives: int = opt(
        7, ge=1, help="negatives per row (e5-mistral trained with 1; 7 leaves choice)"
    )
    dedup_threshold: float = opt(
        0.95, ge=-1, help="drop candidates with passage cosine to a positive above this (>1: off)"
    )
    max_score_ratio: float | None = opt(
        None, gt=0, help="drop candidates scoring above RATIO x the positive's score (0.95: NV)"
    )
    margin: float | None = opt(
        None, help="drop candidates scoring above the positive's score minus MARGIN"
    )
    output_scores: bool = opt(
        False, help="write the embedder's pos_scores / neg_scores (teacher scores to distil)"
    )
    pick: Literal["random", "top"] = opt("random", help="random: a seeded draw; top: best ranks")
    seed: int = opt(42)
    task: str | None = opt(None, help="task for the registry instruction (none: the file name)")
    instruction: str | None = opt(None, help="query instruction for every row")
    batch_size: int = opt(256, ge=1, help="most texts per forward")
    max_length: int | None = opt(None, ge=1, help="passage tokens (none: the model's)")
    cache_dir: Path | None = opt(None, help="corpus embedding cache folder (none: no cache)")
    report: Path | None = opt(None, help="write the JSON report here too")
    allow_extra_fields: bool = opt(False, help="accept rows with unknown keys (ignored)")
    progress: bool = opt(True, help="progress while encoding and mining")

    def validate(self) -> None:
        parse_window(self.window)

    @property
    def bounds(self) -> tuple[int, int]:
        return parse_window(self.window)


@dataclass
class MineReport:
    rows: int = 0
    corpus_docs: int = 0
    candidates: int = 0  # window slots looked at
    dropped_positive: int = 0  # normalised text equal to a positive (or to the query)
    dropped_near_duplicate: int = 0  # cosine to a positive above the threshold
    dropped_score_ratio: int = 0  # scored above max_score_ratio x the positive's score
    dropped_margin: int = 0  # scored above the positive's score minus margin
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
        raise ConfigError(f"--window: {text!r} is not LO-HI, e.g. 30-100") from None
    if not 1 <= lo <= hi:
        raise ConfigError(f"--window: {text!r} needs 1 <= LO <= HI")
    return lo, hi


# --- corpus -------------------------------------------------------------------------------------


def _read_corpus_file(path: Path) -> list[str]:
    """Passage texts of one corpus file (BEIR ``corpus.jsonl`` rows, read by ``beir``)."""
    return [text for _, _, text in iter_corpus(path)]


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
            show_progress=settings.progress,
        )
        if out.shape[1] == 0:
            out = np.zeros((len(examples), emb.shape[1]), np.float32)
        out[rows] = emb
    return out


@dataclass
class _Vectors:
    """Everything mining ranks with: the corpus and positives encoded, the queries encoded."""

    corpus: list[str]
    doc_emb: np.ndarray
    positive_emb: dict[str, np.ndarray]  # positive text -> vector
    query_emb: np.ndarray


def _encode(embedder, examples, corpus, settings, registry, task, report) -> _Vectors:
    from conretriever.retrieval.search import encode_corpus

    timer = time.perf_counter()
    encode = dict(
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        cache_dir=settings.cache_dir,
        show_progress=settings.progress,
    )
    doc_emb = encode_corpus(embedder, corpus, **encode)
    # Positives absent from the corpus still need vectors for the near-duplicate test.
    doc_index = {t: i for i, t in enumerate(corpus)}
    extra = list(dict.fromkeys(p for ex in examples for p in ex.positives if p not in doc_index))
    extra_emb = encode_corpus(embedder, extra, **encode) if extra else doc_emb[:0]
    positive_emb = {t: doc_emb[doc_index[t]] for ex in examples for t in ex.positives
                    if t in doc_index}  # fmt: skip
    positive_emb.update({t: extra_emb[i] for i, t in enumerate(extra)})
    report.seconds["encode_corpus"] = round(time.perf_counter() - timer, 2)
    timer = time.perf_counter()
    q_emb = _query_vectors(embedder, examples, settings, registry, task)
    report.seconds["encode_queries"] = round(time.perf_counter() - timer, 2)
    return _Vectors(corpus, doc_emb, positive_emb, q_emb)


def _select(i, ex, ranked_row, scores_row, v: _Vectors, normalized, settings, report, bands):
    """The negatives of row ``i``: the window's candidates after every rule, then the pick."""
    lo, hi = settings.bounds
    blocked = {normalize_text(p) for p in ex.positives} | {normalize_text(ex.query)}
    pos_emb = np.stack([v.positive_emb[p] for p in ex.positives])
    positive_score = float((pos_emb @ v.query_emb[i]).min())  # the weakest positive
    window = ranked_row[lo - 1 : hi]
    window_scores = scores_row[lo - 1 : hi]
    cosine = (v.doc_emb[window] @ pos_emb.T).max(axis=1) if len(window) else []
    kept: list[tuple[int, float]] = []
    for doc, score, cos in zip(window.tolist(), window_scores.tolist(), cosine, strict=True):
        report.candidates += 1
        if normalized[doc] in blocked:
            report.dropped_positive += 1
            continue
        for band in NEAR_THRESHOLD_BANDS:  # among candidates that are not positives
            bands[band] += int(cos >= band)
        report.max_cosine_to_positive = max(report.max_cosine_to_positive, float(cos))
        if cos > settings.dedup_threshold:
            report.dropped_near_duplicate += 1
        elif (
            settings.max_score_ratio is not None
            and score > settings.max_score_ratio * positive_score
        ):
            report.dropped_score_ratio += 1
        elif settings.margin is not None and score > positive_score - settings.margin:
            report.dropped_margin += 1
        else:
            kept.append((doc, score))
    if settings.pick == "top" or len(kept) <= settings.n_negatives:
        return kept[: settings.n_negatives], pos_emb
    rng = random.Random(f"{settings.seed}:{i}")
    picked = set(rng.sample(range(len(kept)), settings.n_negatives))
    return [c for k, c in enumerate(kept) if k in picked], pos_emb  # rank order


def _write(settings, examples, v: _Vectors, ranked, scores, report) -> None:
    normalized = [normalize_text(t) for t in v.corpus]
    bands = dict.fromkeys(NEAR_THRESHOLD_BANDS, 0)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_files() as stage, open(stage(settings.out), "w", encoding="utf-8") as handle:
        rows = track(examples, "mine", enabled=settings.progress, unit="rows")
        for i, ex in enumerate(rows):
            chosen, pos_emb = _select(i, ex, ranked[i], scores[i], v, normalized, settings,
                                      report, bands)  # fmt: skip
            row = {"query": ex.query, "positive": list(ex.positives)}
            row["negative"] = [v.corpus[d] for d, _ in chosen]
            if ex.instruction:
                row["instruction"] = ex.instruction
            if settings.output_scores:
                row["pos_scores"] = [round(float(x), 6) for x in pos_emb @ v.query_emb[i]]
                row["neg_scores"] = [round(score, 6) for _, score in chosen]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.negatives_written += len(chosen)
            report.rows_short += int(len(chosen) < settings.n_negatives)
            report.per_row[len(chosen)] = report.per_row.get(len(chosen), 0) + 1
    report.near_cosine_counts = {f">={b}": n for b, n in bands.items()}
    report.per_row = dict(sorted(report.per_row.items()))


def mine(settings: MineSettings, embedder=None, registry: TaskRegistry | None = None) -> MineReport:
    """Mine negatives for ``settings.data`` and write ``settings.out``; see module docstring."""
    from conretriever.retrieval.search import exact_search

    timer = time.perf_counter()
    report = MineReport()
    registry = registry or TaskRegistry.load()
    task = settings.task or task_name(settings.data)
    examples = read_task_file(settings.data, task, allow_extra=settings.allow_extra_fields)
    corpus = load_corpus(settings.corpus, examples)
    if not corpus:
        raise DataError(f"{settings.corpus}: empty corpus")
    report.rows, report.corpus_docs = len(examples), len(corpus)
    if embedder is None:
        from conretriever.model.embedder import Embedder

        embedder = Embedder.from_pretrained(settings.model)
    report.seconds["load"] = round(time.perf_counter() - timer, 2)
    vectors = _encode(embedder, examples, corpus, settings, registry, task, report)
    timer = time.perf_counter()
    scores, ranked = exact_search(vectors.query_emb, vectors.doc_emb, settings.bounds[1])
    report.seconds["search"] = round(time.perf_counter() - timer, 2)
    timer = time.perf_counter()
    _write(settings, examples, vectors, ranked, scores, report)
    report.seconds["select_and_write"] = round(time.perf_counter() - timer, 2)
    return report


def run(settings: MineSettings) -> int:
    """``conretriever mine``."""
    refuse_existing([p for p in (settings.out, settings.report) if p], settings.overwrite)
    report = mine(settings)
    text = json.dumps(report.__dict__, indent=2)
    if settings.report:
        settings.report.write_text(text + "\n")
    print(text)
    print(
        f"{settings.out}: {report.rows} rows, {report.negatives_written} negatives "
        f"({report.rows_short} rows short of {settings.n_negatives}); of {report.candidates} "
        f"window candidates dropped {report.dropped_positive} as positives, "
        f"{report.dropped_near_duplicate} as near-duplicates, {report.dropped_score_ratio} by "
        f"--max_score_ratio and {report.dropped_margin} by --margin"
    )
    return 0
