"""Hard-negative mining: retrieve with any Embedder, take negatives from a window of ranks.

Contrastive training learns most from negatives the model finds hard; E5 and its successors mine
them with a retriever. For each training row:

1. the query is encoded as a query (``role="query"``) with the row's own instruction, else the
   task's registry instruction (the task is the file name, as in training); the corpus is
   encoded once as passages through ``retrieval.corpus.encode_corpus`` (disk cache keyed by
   model and text, so mining again with the same model, or evaluating it on the same corpus, is
   free; under torchrun each rank encodes its own slice);
2. ``retrieval.search.search`` ranks the corpus with the streaming exact search evaluation uses
   (memory bounded by ``--search_memory_gb``, each rank its slice, only top-k gathered), rows
   in blocks of 8192; candidates are the documents at 1-based ranks
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
4. positive-aware rules (NV-Retriever, arXiv 2407.15831) drop candidates that score close to
   the row's positive, likely false negatives: ``--max_score_ratio 0.95`` drops those scoring
   above 95% of the positive's score, ``--margin m`` those above the positive's score minus m
   (with several positives, the weakest positive's score: the stricter test). The report counts
   what each rule dropped;
5. ``n_negatives`` of the remaining candidates are drawn at random (seeded per row; ``--pick
   top`` takes the best-ranked instead) and written in rank order into ``negative``; with
   ``--output_scores`` the row also gets the embedder's ``pos_scores`` and ``neg_scores``
   (query-document cosine), the teacher scores a smaller model can distil.

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
from conretriever.files import atomic_files, output_file, refuse_existing, write_text, writing
from conretriever.model.settings import EmbedderSettings
from conretriever.options import opt, output_opt

NEAR_THRESHOLD_BANDS = (0.9, 0.95, 0.98)  # report how many candidates sit above each


@dataclass
class MineSettings:
    """``conretriever mine`` flags (and the Python API's settings)."""

    model: str | None = opt(None, required=True, help="model spec (dir, hub id, embedded:...)")
    data: Path | None = opt(None, required=True, help="training task file (.jsonl[.gz])")
    corpus: str | None = opt(None, required=True, help="corpus.jsonl, a folder, or 'self'")
    output: Path | None = output_opt(None, required=True, help="the mined training file")
    overwrite: bool = opt(False, help="replace an existing --output / --report")
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
    min_negatives: int = opt(
        0, ge=0, help="leave out rows left with fewer negatives than this (0: write every row)"
    )
    pick: Literal["random", "top"] = opt("random", help="random: a seeded draw; top: best ranks")
    seed: int = opt(42)
    task: str | None = opt(None, help="task for the registry instruction (none: the file name)")
    instruction: str | None = opt(None, help="query instruction for every row")
    batch_size: int = opt(256, ge=1, help="most texts per forward")
    embedder: EmbedderSettings = opt(default_factory=EmbedderSettings)
    cache_dir: Path | None = opt(None, help="corpus embedding cache folder (none: no cache)")
    search_memory_gb: float = opt(
        2.0, gt=0, help="memory for the corpus blocks being scored (any corpus size)"
    )
    report: Path | None = opt(None, help="write the JSON report here too")
    allow_extra_fields: bool = opt(False, help="accept rows with unknown keys (ignored)")
    progress: bool = opt(True, help="progress while encoding and mining")

    def validate(self) -> None:
        parse_window(self.window)
        if self.min_negatives > self.n_negatives:
            raise ConfigError(
                f"--min_negatives {self.min_negatives} is more than --n_negatives "
                f"{self.n_negatives}: no row could be written"
            )

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
    rows_left_out: int = 0  # rows with fewer than min_negatives: not written
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
    """Encode queries grouped by instruction (one encode call per distinct instruction),
    split over ranks under torchrun (every rank gets them all)."""
    from conretriever.retrieval.corpus import encode_sharded

    groups: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        inst = settings.instruction or ex.instruction or registry.instruction(task)
        groups.setdefault(inst, []).append(i)
    out = None
    for inst, rows in groups.items():
        emb = encode_sharded(
            embedder,
            [examples[i].query for i in rows],
            role="query",
            instruction=inst,
            batch_size=settings.batch_size,
            show_progress=settings.progress,
        )
        if out is None:
            out = np.zeros((len(examples), emb.shape[1]), np.float32)
        out[rows] = emb
    return out


@dataclass
class _Block:
    """One block of rows: queries, positives (padded [rows, P, dim] + mask) and ranked
    candidates (global ids, scores, max cosine to the row's positives)."""

    start: int
    query_emb: np.ndarray
    pos_emb: np.ndarray
    pos_mask: np.ndarray
    ranked: np.ndarray
    scores: np.ndarray
    cosine: np.ndarray


def _positive_vectors(embedder, rows, corpus, doc_index, settings) -> tuple[np.ndarray, np.ndarray]:
    """[rows, P, dim] positive vectors (zero-padded) and their [rows, P] mask. One process takes
    the corpus's own vectors for positives found in it; under torchrun every rank encodes all
    positives (the corpus vectors of a positive may live on another rank)."""
    from conretriever import runtime
    from conretriever.retrieval.corpus import encode_sharded

    texts = list(dict.fromkeys(p for ex in rows for p in ex.positives))
    in_corpus = [] if runtime.is_distributed() else [t for t in texts if t in doc_index]
    encode = [t for t in texts if t not in set(in_corpus)]
    vectors = {}
    if in_corpus:
        found = corpus.rows(np.array([doc_index[t] for t in in_corpus]))
        vectors.update(zip(in_corpus, found, strict=True))
    if encode:
        emb = encode_sharded(embedder, encode, role="passage", batch_size=settings.batch_size,
                             show_progress=False)  # fmt: skip
        vectors.update(zip(encode, emb, strict=True))
    width = max(len(ex.positives) for ex in rows)
    out = np.zeros((len(rows), width, corpus.dim), np.float32)
    mask = np.zeros((len(rows), width), bool)
    for i, ex in enumerate(rows):
        for j, p in enumerate(ex.positives):
            out[i, j], mask[i, j] = vectors[p], True
    return out, mask


def _search_block(embedder, rows, start, corpus, doc_index, settings, registry, task, memory_gb):
    """Rank the corpus for one block of rows; the cosine of each candidate to the row's
    positives is computed where the candidate's vector lives (``search``'s payload)."""
    import torch

    from conretriever.retrieval.search import search

    q = _query_vectors(embedder, rows, settings, registry, task)
    pos, mask = _positive_vectors(embedder, rows, corpus, doc_index, settings)

    def max_cosine(first: int, cand: torch.Tensor) -> torch.Tensor:
        p = torch.from_numpy(pos[first : first + len(cand)]).to(cand.device)
        m = torch.from_numpy(mask[first : first + len(cand)]).to(cand.device)
        cos = torch.einsum("qkd,qpd->qkp", cand, p).masked_fill(~m[:, None, :], -torch.inf)
        return cos.max(dim=2).values

    hi = settings.bounds[1]
    scores, ranked, cosine = search(q, corpus, hi, memory_gb=memory_gb, payload=max_cosine,
                                    query_block=len(q))  # fmt: skip
    return _Block(start, q, pos, mask, ranked, scores, cosine)


def _select(i, ex, block: _Block, normalized, settings, report, bands):
    """The negatives of row ``i`` of ``block``: the window's candidates after every rule, then
    the pick. Returns [(doc id, score)] in rank order."""
    lo, hi = settings.bounds
    blocked = {normalize_text(p) for p in ex.positives} | {normalize_text(ex.query)}
    q = block.query_emb[i]
    positive_score = float((block.pos_emb[i][block.pos_mask[i]] @ q).min())  # the weakest
    window = block.ranked[i, lo - 1 : hi]
    kept: list[tuple[int, float]] = []
    for doc, score, cos in zip(window.tolist(), block.scores[i, lo - 1 : hi].tolist(),
                               block.cosine[i, lo - 1 : hi].tolist(), strict=True):  # fmt: skip
        report.candidates += 1
        if normalized[doc] in blocked:
            report.dropped_positive += 1
            continue
        for band in NEAR_THRESHOLD_BANDS:  # among candidates that are not positives
            bands[band] += int(cos >= band)
        report.max_cosine_to_positive = max(report.max_cosine_to_positive, float(cos))
        if cos > settings.dedup_threshold:
            report.dropped_near_duplicate += 1
        elif settings.max_score_ratio is not None and score > settings.max_score_ratio * (
            positive_score
        ):
            report.dropped_score_ratio += 1
        elif settings.margin is not None and score > positive_score - settings.margin:
            report.dropped_margin += 1
        else:
            kept.append((doc, score))
    if settings.pick == "top" or len(kept) <= settings.n_negatives:
        return kept[: settings.n_negatives]
    rng = random.Random(f"{settings.seed}:{block.start + i}")
    picked = set(rng.sample(range(len(kept)), settings.n_negatives))
    return [c for k, c in enumerate(kept) if k in picked]  # rank order


def _write_block(handle, rows, block: _Block, corpus_texts, normalized, settings, report, bands):
    for i, ex in enumerate(rows):
        chosen = _select(i, ex, block, normalized, settings, report, bands)
        report.rows_short += int(len(chosen) < settings.n_negatives)
        report.per_row[len(chosen)] = report.per_row.get(len(chosen), 0) + 1
        if len(chosen) < settings.min_negatives:
            report.rows_left_out += 1
            continue
        row = {"query": ex.query, "positive": list(ex.positives)}
        row["negative"] = [corpus_texts[d] for d, _ in chosen]
        if ex.instruction:
            row["instruction"] = ex.instruction
        if settings.output_scores:
            pos = block.pos_emb[i][block.pos_mask[i]] @ block.query_emb[i]
            row["pos_scores"] = [round(float(x), 6) for x in pos]
            row["neg_scores"] = [round(score, 6) for _, score in chosen]
        if handle is not None:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        report.negatives_written += len(chosen)


ROW_BLOCK = 8192  # rows mined at once: their queries, positives and rankings stay in memory


def mine(settings: MineSettings, embedder=None, registry: TaskRegistry | None = None) -> MineReport:
    """Mine negatives for ``settings.data`` and write ``settings.output``; see module docstring."""
    from conretriever import runtime
    from conretriever.progress import Progress
    from conretriever.retrieval.corpus import encode_corpus

    timer = time.perf_counter()
    report = MineReport()
    registry = registry or TaskRegistry.load()
    task = settings.task or task_name(settings.data)
    examples = read_task_file(settings.data, task, allow_extra=settings.allow_extra_fields)
    corpus_texts = load_corpus(settings.corpus, examples)
    if not corpus_texts:
        raise DataError(f"{settings.corpus}: empty corpus")
    report.rows, report.corpus_docs = len(examples), len(corpus_texts)
    if embedder is None:
        from conretriever.model.embedder import Embedder

        embedder = Embedder.from_pretrained(
            settings.model, settings.embedder, device=runtime.init_distributed().device
        )
    report.seconds["load"] = round(time.perf_counter() - timer, 2)
    timer = time.perf_counter()
    corpus = encode_corpus(embedder, corpus_texts, batch_size=settings.batch_size,
                           cache_dir=settings.cache_dir,
                           show_progress=settings.progress,
                           memory_gb=settings.search_memory_gb)  # fmt: skip
    report.seconds["encode_corpus"] = round(time.perf_counter() - timer, 2)
    timer = time.perf_counter()
    doc_index = {t: i for i, t in enumerate(corpus_texts)}
    normalized = [normalize_text(t) for t in corpus_texts]
    bands = dict.fromkeys(NEAR_THRESHOLD_BANDS, 0)
    main_rank = runtime.is_main()
    if main_rank:
        with writing(settings.output, "--output"):
            settings.output.parent.mkdir(parents=True, exist_ok=True)
    bar = Progress(len(examples), "mine", enabled=settings.progress and main_rank, unit="rows")
    with writing(settings.output, "--output"), atomic_files() as stage, bar:
        handle = open(stage(settings.output), "w", encoding="utf-8") if main_rank else None  # noqa: SIM115
        try:
            for start in range(0, len(examples), ROW_BLOCK):
                rows = examples[start : start + ROW_BLOCK]
                block = _search_block(embedder, rows, start, corpus, doc_index, settings,
                                      registry, task, settings.search_memory_gb)  # fmt: skip
                _write_block(handle, rows, block, corpus_texts, normalized, settings, report,
                             bands)  # fmt: skip
                bar.update(len(rows))
        finally:
            if handle is not None:
                handle.close()
    report.near_cosine_counts = {f">={b}": n for b, n in bands.items()}
    report.per_row = dict(sorted(report.per_row.items()))
    report.seconds["search_select_write"] = round(time.perf_counter() - timer, 2)
    return report


def run(settings: MineSettings) -> int:
    """``conretriever mine`` (also under torchrun: each rank encodes and searches its slice of
    the corpus; rank 0 writes)."""
    from conretriever import runtime

    output_file(settings.output, "--output")
    if settings.report:
        output_file(settings.report, "--report")
    refuse_existing([p for p in (settings.output, settings.report) if p], settings.overwrite)
    report = mine(settings)
    if not runtime.is_main():
        return 0
    text = json.dumps(report.__dict__, indent=2)
    if settings.report:
        with writing(settings.report, "--report"):
            write_text(settings.report, text + "\n")
    print(text)
    print(
        f"{settings.output}: {report.rows} rows, {report.negatives_written} negatives "
        f"({report.rows_short} rows short of {settings.n_negatives}, {report.rows_left_out} left "
        f"out by --min_negatives); of {report.candidates} "
        f"window candidates dropped {report.dropped_positive} as positives, "
        f"{report.dropped_near_duplicate} as near-duplicates, {report.dropped_score_ratio} by "
        f"--max_score_ratio and {report.dropped_margin} by --margin"
    )
    return 0
