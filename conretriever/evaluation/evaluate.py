"""Evaluate: e5-style retrieval evaluation on BEIR folders and MTEB tasks.

How e5-mistral was evaluated, and what this module does the same way:

* **Queries** get the task's official instruction (``conretriever.data.tasks.eval_instruction``) in
  the model's prompt format (``Instruct: {instruction}\\nQuery: {query}`` for e5); ``--instruction``
  overrides it. Models saved with ``prompt_format="none"`` (sentence-transformers encoders such
  as ``embedded:minilm``) get no instruction text at all (``Embedder.format`` decides that).
* **Documents** get no instruction: title and text joined with a space
  (``conretriever.data.tasks.format_document``), so one cached corpus encoding serves every query
  set.
* **Search** is exact inner product over unit vectors (``conretriever.retrieval.search``): the top
  1000 documents per query; for the tasks where MTEB sets ``ignore_identical_ids`` (ArguAna, FEVER,
  FiQA2018, MSMARCO, QuoraRetrieval; ``conretriever.data.beir.IGNORE_IDENTICAL_IDS``) a document
  whose id equals the query id is then dropped from that query's ranking, as MTEB does.
* **Metrics** follow MTEB 2.x, which takes them from ``trec_eval``: nDCG@k, MAP@k, recall@k, P@k
  and MRR@k, averaged over the queries that have a relevant document.
  ``conretriever.evaluation.metrics`` computes them in numpy (pinned to mteb's own evaluator by a
  test), so the offline path needs neither mteb nor pytrec_eval: the GPU machines have neither.

Two ways in:

* ``--beir-dir PATH`` (or :func:`evaluate_beir_dir` from Python, e.g. on an in-memory, possibly
  LoRA-wrapped Embedder, as ``benchmarks/quality.py`` does): a local BEIR folder
  (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, each optionally ``.gz``; read by
  ``conretriever.data.beir``) evaluated fully offline. A folder of BEIR folders (CQADupStack's 12
  subforums) is one task: the average over them. With ``--engine mteb`` the folder runs as a
  local ``mteb`` retrieval task instead, and mteb computes the metrics (same numbers, a
  cross-check).
* ``--tasks SciFact ArguAna ...`` / presets ``beir15``, ``small``: named MTEB tasks through
  ``mteb.evaluate`` (mteb downloads the data, so this needs the internet). The model wrapper
  (``conretriever.evaluation.mteb_bridge``) does its own cached corpus encoding and exact search, so
  both paths rank identically.

Outputs (``--output``): ``<task>.json`` per task, ``summary.md`` (a table with the average)
and ``settings.json`` (model, fingerprint, instructions, lengths, batch size, seconds per task).
All JSON is strict (NaN written as null). This module never imports mteb; ``mteb_bridge`` imports
it only inside the functions that use it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from conretriever import runtime
from conretriever.data.beir import IGNORE_IDENTICAL_IDS, BeirData, load_beir_dir
from conretriever.data.tasks import eval_instruction
from conretriever.errors import ConfigError
from conretriever.evaluation.metrics import K_VALUES, MAIN_SCORE, retrieval_metrics
from conretriever.evaluation.mteb_bridge import evaluate_with_mteb, local_mteb_task, mteb_tasks
from conretriever.files import output_folder, refuse_existing, write_json, write_text, writing
from conretriever.model.card import record_eval
from conretriever.model.prompts import query_prefix
from conretriever.model.settings import EmbedderSettings
from conretriever.options import opt, output_opt, to_dict
from conretriever.retrieval.corpus import encode_corpus, encode_sharded, model_fingerprint
from conretriever.retrieval.search import build_index, index_search, recall_at_k, search

log = logging.getLogger("conretriever.eval")

# The BEIR-15 set e5-mistral reported (MTEB names) and a quick subset of small corpora.
BEIR15 = (
    "ArguAna ClimateFEVER CQADupstackRetrieval DBPedia FEVER FiQA2018 HotpotQA MSMARCO NFCorpus "
    "NQ QuoraRetrieval SCIDOCS SciFact Touche2020 TRECCOVID"
).split()
PRESETS = {"beir15": BEIR15, "small": ["SciFact", "NFCorpus", "ArguAna", "SCIDOCS", "FiQA2018"]}


@dataclass
class EvalSettings:
    """One evaluation run: ``conretriever eval`` flags, or :func:`evaluate_beir_dir` arguments.
    Saved in ``settings.json`` beside the results."""

    model: str | None = opt(None, help="model dir, HF id or embedded:<name> (or --base_model_of)")
    base_model_of: str | None = opt(
        None,
        help="a training run folder: evaluate its untrained base model with the settings its "
        "final/ model was trained with (the 'did training help' baseline); instead of --model",
    )
    tasks: list[str] = opt(default_factory=list, commas="split",
                           help="MTEB task names or presets beir15, small")  # fmt: skip
    beir_dir: list[str] = opt(default_factory=list, commas="path",
                              help="local BEIR folders (offline)")  # fmt: skip
    output: str = output_opt(
        "eval_results", help="folder for <task>.json, summary.md and settings.json"
    )
    overwrite: bool = opt(False, help="replace results already in --output")
    batch_size: int = opt(256, ge=1, help="most texts per forward (the token budget binds first)")
    embedder: EmbedderSettings = opt(default_factory=EmbedderSettings)
    instruction: str | None = opt(None, help="one instruction for every task (none: e5's)")
    cache: bool = opt(True, help="read and write the corpus embedding cache")
    cache_dir: str | None = opt(None, help="none: $CONRETRIEVER_CACHE/embeddings")
    top_k: int = opt(max(K_VALUES), ge=1, help="documents retrieved per query")
    search_memory_gb: float = opt(
        2.0, gt=0, help="memory for the corpus blocks being scored (peak ~ this, any corpus size)"
    )
    store_dtype: Literal["float32", "float16"] = opt(
        "float32", help="embedding cache dtype (float16: half the disk and memory)"
    )
    index: Literal["flat", "ivf", "hnsw", "ivfpq"] = opt(
        "flat", help="flat: exact search; others: approximate faiss index (recall reported)"
    )
    recall_queries: int = opt(
        1000, ge=1, help="queries searched exactly too, to measure an approximate index"
    )
    max_queries: int | None = opt(None, ge=1, help="only the first N judged queries")
    split: str | None = opt(None, help="qrels split of local folders (none: test, MS MARCO dev)")
    engine: Literal["native", "mteb"] = opt(
        "native", help="local folders: our metrics (native) or a local mteb task (cross-check)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", help="encoding dtype (auto: bf16 where the device computes it natively)"
    )
    progress: bool = opt(True, help="progress bar / lines while encoding")

    def validate(self) -> None:
        if self.model is not None and self.base_model_of is not None:
            raise ConfigError("give --model or --base_model_of, not both")
        if self.model is None and self.base_model_of is None:
            raise ConfigError("--model is required (or --base_model_of RUN_DIR)")
        if (self.model is not None or self.base_model_of) and not self.tasks and not self.beir_dir:
            raise ConfigError("give --tasks and/or --beir_dir")

    def model_and_settings(self) -> tuple[str, EmbedderSettings]:
        """The model spec to load and the embedder settings to load it with: ``--model`` and
        the flags given; or, with ``--base_model_of RUN``, the run's base model (its
        ``config.yaml``) with its ``final/`` model's settings, the flags given overriding."""
        if self.base_model_of is None:
            if self.model is None:
                raise ConfigError("--model is required (or --base_model_of RUN_DIR)")
            return self.model, self.embedder
        import yaml

        from conretriever.model.export import saved_settings
        from conretriever.saved_config import upgrade_saved

        run = Path(self.base_model_of)
        config, final = run / "config.yaml", run / "final"
        if not config.is_file() or not final.is_dir():
            raise ConfigError(
                f"--base_model_of {run}: not a finished training run (needs config.yaml and final/)"
            )
        try:
            saved = upgrade_saved(yaml.safe_load(config.read_text()) or {})
            base = saved["model"]["model_name_or_path"]
        except (yaml.YAMLError, KeyError, TypeError) as err:
            raise ConfigError(f"{config}: no model.model_name_or_path ({err})") from None
        trained = saved_settings(str(final)) or EmbedderSettings()
        return str(base), self.embedder.over(trained)

    def resolved_cache_dir(self) -> Path | None:
        if not self.cache:
            return None
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


def default_cache_dir() -> Path:
    root = os.environ.get("CONRETRIEVER_CACHE") or Path.home() / ".cache" / "conretriever"
    return Path(root) / "embeddings"


# ----- the offline path -------------------------------------------------------------------------
def search_run(
    embedder,
    data: BeirData,
    settings: EvalSettings,
    instruction: str | None,
    ann: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Encode (cached corpus, sorted batches) and search one BEIR folder -> run dict. With an
    approximate ``settings.index``, ``ann`` receives its recall@100 against exact search."""
    qids = [
        q for q in data.qrels if q in data.queries and any(g >= 1 for g in data.qrels[q].values())
    ]
    if settings.max_queries is not None:
        qids = qids[: settings.max_queries]
    corpus = encode_corpus(
        embedder,
        data.corpus_texts,
        batch_size=settings.batch_size,
        cache_dir=settings.resolved_cache_dir(),
        store_dtype=settings.store_dtype,
        show_progress=settings.progress,
        memory_gb=settings.search_memory_gb,
    )
    query_emb = encode_sharded(
        embedder,
        [data.queries[q] for q in qids],
        role="query",
        instruction=instruction,
        batch_size=settings.batch_size,
        show_progress=settings.progress,
    )
    scores, indices = _ranked(query_emb, corpus, settings, ann)
    drop_self = data.name in IGNORE_IDENTICAL_IDS
    run = {}
    for row, qid in enumerate(qids):
        ranking = {
            data.corpus_ids[i]: float(s) for s, i in zip(scores[row], indices[row], strict=True)
        }
        if drop_self:
            ranking.pop(qid, None)
        run[qid] = ranking
    return run


def _ranked(query_emb, corpus, settings: EvalSettings, ann: dict | None):
    """Exact streaming search, or the approximate index with its recall measured against exact
    search on the first ``recall_queries`` queries."""
    k = settings.top_k
    if settings.index == "flat":
        return search(query_emb, corpus, k, memory_gb=settings.search_memory_gb)
    index = build_index(corpus, settings.index, memory_gb=settings.search_memory_gb)
    scores, indices = index_search(index, query_emb, corpus, k)
    sample = query_emb[: settings.recall_queries]
    _, exact = search(sample, corpus, min(100, k), memory_gb=settings.search_memory_gb)
    recall = recall_at_k(indices[: len(sample), : exact.shape[1]], exact)
    if ann is not None:
        ann.update({"index": settings.index, "recall_at_100_vs_exact": recall,
                    "recall_queries": len(sample)})  # fmt: skip
    if runtime.is_main():
        log.info("%s index: recall@100 vs exact search %.4f (%d queries)", settings.index,
                 recall, len(sample))  # fmt: skip
    return scores, indices


def evaluate_beir_dir(
    embedder,
    beir_dir: str | Path | BeirData,
    *,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    instruction: str | None = None,
    output_dir: str | Path | None = None,
    max_queries: int | None = None,
    split: str | None = None,
    show_progress: bool = True,
    search_memory_gb: float = 2.0,
    store_dtype: str = "float32",
    index: str = "flat",
) -> dict:
    """Evaluate an in-memory Embedder (training mode and LoRA fine: ``encode`` switches to eval
    and back) on a BEIR folder. Returns the metrics dict (``ndcg_at_10``, ...) plus
    ``instruction``, ``seconds``; with ``output_dir``, also writes ``<task>.json``. No cache
    unless ``cache_dir`` is given."""
    settings = EvalSettings(
        batch_size=batch_size,
        cache=cache_dir is not None,
        cache_dir=None if cache_dir is None else str(cache_dir),
        instruction=instruction,
        max_queries=max_queries,
        split=split,
        progress=show_progress,
        search_memory_gb=search_memory_gb,
        store_dtype=store_dtype,
        index=index,
    )
    data = beir_dir if isinstance(beir_dir, BeirData) else load_beir_dir(beir_dir, split)
    result = _evaluate_data(embedder, data, settings)
    if output_dir is not None and runtime.is_main():
        write_json(Path(output_dir) / f"{data.name}.json", result)
    return result["metrics"]


def _evaluate_data(embedder, data: BeirData, settings: EvalSettings) -> dict:
    start = time.perf_counter()
    instruction = (
        settings.instruction if settings.instruction is not None else eval_instruction(data.name)
    )
    parts = data.subsets or [data]
    per_part = {}
    ann: dict = {}
    for part in parts:
        run = search_run(embedder, part, settings, instruction, ann)
        per_part[Path(part.source).name or part.name] = retrieval_metrics(part.qrels, run)
    if data.subsets:  # CQADupStack: the task score is the mean over subforums
        metrics = {
            k: float(np.mean([m[k] for m in per_part.values()]))
            for k in next(iter(per_part.values()))
        }
        metrics["n_queries"] = int(sum(m["n_queries"] for m in per_part.values()))
    else:
        metrics = next(iter(per_part.values()))
    seconds = time.perf_counter() - start
    saved = getattr(embedder, "settings", None)
    fmt = getattr(saved, "prompt_format", None)
    # What queries really got: an encoder saved with prompt_format "none" ignores the instruction,
    # and so does a model with a fixed query prompt of its own.
    applied = query_prefix(instruction, fmt, saved.query_prompt) if fmt else None
    metrics = {
        **metrics,
        "instruction": instruction,
        "query_prefix": applied,
        "seconds": round(seconds, 2),
    }
    result = {
        "task": data.name,
        "source": data.source,
        "split": data.split,
        "engine": "native",
        "main_score": MAIN_SCORE,
        "metrics": metrics,
    }
    if data.subsets:
        result["subsets"] = per_part
    if ann:
        result["approximate_search"] = ann
    return result


def expand_tasks(names: list[str]) -> list[str]:
    """Presets (``beir15``, ``small``) -> MTEB task names, duplicates dropped, order kept."""
    out: list[str] = []
    for name in names:
        for task in PRESETS.get(name.lower(), [name]):
            if task not in out:
                out.append(task)
    return out


# ----- outputs ----------------------------------------------------------------------------------
SUMMARY_COLUMNS = (
    ("nDCG@10", "ndcg_at_10"),
    ("MAP@10", "map_at_10"),
    ("R@100", "recall_at_100"),
    ("MRR@10", "mrr_at_10"),
)


def summary_table(results: list[dict]) -> str:
    """Markdown table, scores x100, last row the average over tasks."""

    def cell(value) -> str:
        return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"

    header = "| task | " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " | queries | seconds |"
    lines = [header, "|" + "---|" * (len(SUMMARY_COLUMNS) + 3)]
    for r in results:
        m = r["metrics"]
        cells = " | ".join(cell(m.get(key)) for _, key in SUMMARY_COLUMNS)
        lines.append(f"| {r['task']} | {cells} | {m.get('n_queries', '-')} | {m['seconds']} |")
    if results:
        avg = []
        for _, key in SUMMARY_COLUMNS:
            values = [r["metrics"].get(key) for r in results]
            ok = [v for v in values if v is not None and math.isfinite(v)]
            avg.append(cell(float(np.mean(ok))) if len(ok) == len(values) else "-")
        lines.append(f"| **average ({len(results)})** | " + " | ".join(avg) + " | | |")
    return "\n".join(lines) + "\n"


def run(settings: EvalSettings) -> int:
    """``conretriever eval``: every folder and task read and checked first, then evaluated."""
    from conretriever.model.embedder import Embedder

    info = runtime.init_distributed()
    out = output_folder(settings.output, "--output")  # before an hour of encoding
    # Read every folder and look up every task first: a malformed file or a misspelt task name
    # fails in seconds, not after an hour of encoding.
    folders = [load_beir_dir(p, settings.split) for p in settings.beir_dir]
    named = []
    if settings.tasks:
        try:
            named = mteb_tasks(expand_tasks(settings.tasks))
        except KeyError as err:
            raise ConfigError(f"--tasks: {err.args[0]}") from None
    names = [d.name for d in folders] + [t.metadata.name for t in named]
    planned = [out / f"{name}.json" for name in names]
    refuse_existing(planned, settings.overwrite, "evaluation result")
    spec, embedder_settings = settings.model_and_settings()
    embedder = Embedder.from_pretrained(spec, embedder_settings, dtype=settings.dtype,
                                        device=info.device)  # fmt: skip
    results = []
    for data in folders:
        if settings.engine == "mteb" and not data.subsets:
            found = evaluate_with_mteb(embedder, [local_mteb_task(data)], settings, spec)
            results.append({**found[0], "source": data.source})
        else:
            results.append(_evaluate_data(embedder, data, settings))
        if info.is_main:
            print(f"{data.name}: nDCG@10 = {100 * results[-1]['metrics'][MAIN_SCORE]:.2f}")
    failed = []
    for task in named:  # one at a time: a task that cannot download does not stop the others
        try:
            results += evaluate_with_mteb(embedder, [task], settings, spec)
        except (ConnectionError, OSError) as err:
            failed.append(task.metadata.name)
            print(
                f"conretriever eval: {task.metadata.name}: cannot load its data ({err}); "
                "offline? evaluate a local copy with --beir_dir",
                file=sys.stderr,
            )
    if info.is_main:
        with writing(out, "--output"):
            _write_outputs(out, settings, spec, embedder, results)
    runtime.cleanup()  # every rank waits for rank 0's writes, then leaves the group together
    return 1 if failed else 0


def _write_outputs(out: Path, settings: EvalSettings, spec: str, embedder, results: list[dict]
                   ) -> None:  # fmt: skip
    for r in results:
        write_json(out / f"{r['task']}.json", r)
    fmt, fixed = embedder.settings.prompt_format, embedder.settings.query_prompt
    record = {
        "model": spec,
        "model_fingerprint": model_fingerprint(embedder),
        "embedder_settings": asdict(embedder.settings),
        "eval_settings": to_dict(settings),
        "instructions": {r["task"]: r["metrics"]["instruction"] for r in results},
        "query_prefixes": {
            r["task"]: query_prefix(r["metrics"]["instruction"], fmt, fixed) for r in results
        },
        "seconds_per_task": {r["task"]: r["metrics"]["seconds"] for r in results},
        "world_size": runtime.world_size(),
    }
    write_json(out / "settings.json", record)
    table = summary_table(results)
    write_text(out / "summary.md", f"# Retrieval evaluation: `{spec}`\n\n{table}")
    if settings.model and Path(spec).is_dir():  # a saved model folder: its card lists these
        with writing(spec, "--model (its model card)"):
            record_eval(Path(spec), results, str(out))
    print(table)
