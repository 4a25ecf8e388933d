"""Evaluate: e5-style retrieval evaluation on BEIR folders and MTEB tasks.

How e5-mistral was evaluated, and what this module does the same way:

* **Queries** get the task's official instruction (``conretriever.tasks.eval_instruction``) in the
  model's prompt format (``Instruct: {instruction}\\nQuery: {query}`` for e5); ``--instruction``
  overrides it. Models saved with ``prompt_format="none"`` (sentence-transformers encoders such
  as ``embedded:minilm``) get no instruction text at all (``Embedder.format`` decides that).
* **Documents** get no instruction: title and text joined with a space
  (``conretriever.tasks.format_document``), so one cached corpus encoding serves every query set.
* **Search** is exact inner product over unit vectors (``conretriever.search``): the top 1000
  documents per query; for the tasks where MTEB sets ``ignore_identical_ids`` (ArguAna, FEVER,
  FiQA2018, MSMARCO, QuoraRetrieval; ``conretriever.beir.IGNORE_IDENTICAL_IDS``) a document whose
  id equals the query id is then dropped from that query's ranking, as MTEB does.
* **Metrics** follow MTEB 2.x, which takes them from ``trec_eval``: nDCG@k, MAP@k, recall@k, P@k
  and MRR@k, averaged over the queries that have a relevant document. ``conretriever.metrics``
  computes them in numpy (pinned to mteb's own evaluator by a test), so the offline path needs
  neither mteb nor pytrec_eval: the GPU machines have neither.

Two ways in:

* ``--beir-dir PATH`` (or :func:`evaluate_beir_dir` from Python, e.g. on an in-memory, possibly
  LoRA-wrapped Embedder, as ``benchmarks/quality.py`` does): a local BEIR folder
  (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``, each optionally ``.gz``; read by
  ``conretriever.beir``) evaluated fully offline. A folder of BEIR folders (CQADupStack's 12
  subforums) is one task: the average over them. With ``--engine mteb`` the folder runs as a
  local ``mteb`` retrieval task instead, and mteb computes the metrics (same numbers, a
  cross-check).
* ``--tasks SciFact ArguAna ...`` / presets ``beir15``, ``small``: named MTEB tasks through
  ``mteb.evaluate`` (mteb downloads the data, so this needs the internet). The model wrapper
  (``conretriever.mteb_bridge``) does its own cached corpus encoding and exact search, so both
  paths rank identically.

Outputs (``--output-dir``): ``<task>.json`` per task, ``summary.md`` (a table with the average)
and ``settings.json`` (model, fingerprint, instructions, lengths, batch size, seconds per task).
All JSON is strict (NaN written as null). This module never imports mteb; ``mteb_bridge`` imports
it only inside the functions that use it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from conretriever.beir import IGNORE_IDENTICAL_IDS, BeirData, load_beir_dir
from conretriever.metrics import K_VALUES, MAIN_SCORE, retrieval_metrics
from conretriever.mteb_bridge import evaluate_with_mteb, local_mteb_task, mteb_tasks
from conretriever.search import encode_corpus, encode_sharded, exact_search, model_fingerprint
from conretriever.tasks import eval_instruction, query_prefix

# The BEIR-15 set e5-mistral reported (MTEB names) and a quick subset of small corpora.
BEIR15 = (
    "ArguAna ClimateFEVER CQADupstackRetrieval DBPedia FEVER FiQA2018 HotpotQA MSMARCO NFCorpus "
    "NQ QuoraRetrieval SCIDOCS SciFact Touche2020 TRECCOVID"
).split()
PRESETS = {"beir15": BEIR15, "small": ["SciFact", "NFCorpus", "ArguAna", "SCIDOCS", "FiQA2018"]}


@dataclass
class EvalSettings:
    """Knobs of one evaluation run; saved in ``settings.json``."""

    batch_size: int = 256
    query_max_length: int | None = None  # None: the embedder's own setting
    doc_max_length: int | None = None
    instruction: str | None = None  # None: the task's e5-mistral instruction
    cache_dir: str | None = None  # corpus embedding cache; None disables it
    top_k: int = max(K_VALUES)
    max_queries: int | None = None  # evaluate only the first N queries (quick checks)
    split: str | None = None  # None: "test" (or beir.DEFAULT_SPLIT)
    show_progress: bool = True


def default_cache_dir() -> Path:
    root = os.environ.get("CONRETRIEVER_CACHE") or Path.home() / ".cache" / "conretriever"
    return Path(root) / "embeddings"


# ----- the offline path -------------------------------------------------------------------------
def search_run(
    embedder,
    data: BeirData,
    settings: EvalSettings,
    instruction: str | None,
) -> dict[str, dict[str, float]]:
    """Encode (cached corpus, sorted batches) and exact-search one BEIR folder -> run dict."""
    qids = [
        q for q in data.qrels if q in data.queries and any(g >= 1 for g in data.qrels[q].values())
    ]
    if settings.max_queries is not None:
        qids = qids[: settings.max_queries]
    doc_emb = encode_corpus(
        embedder,
        data.corpus_texts,
        batch_size=settings.batch_size,
        max_length=settings.doc_max_length,
        cache_dir=settings.cache_dir,
        show_progress=settings.show_progress,
    )
    query_emb = encode_sharded(
        embedder,
        [data.queries[q] for q in qids],
        role="query",
        instruction=instruction,
        batch_size=settings.batch_size,
        max_length=settings.query_max_length,
        show_progress=settings.show_progress,
    )
    scores, indices = exact_search(query_emb, doc_emb, settings.top_k)
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
) -> dict:
    """Evaluate an in-memory Embedder (training mode and LoRA fine: ``encode`` switches to eval
    and back) on a BEIR folder. Returns the metrics dict (``ndcg_at_10``, ...) plus
    ``instruction``, ``seconds``; with ``output_dir``, also writes ``<task>.json``."""
    settings = EvalSettings(
        batch_size=batch_size,
        cache_dir=None if cache_dir is None else str(cache_dir),
        instruction=instruction,
        max_queries=max_queries,
        split=split,
        show_progress=show_progress,
    )
    data = beir_dir if isinstance(beir_dir, BeirData) else load_beir_dir(beir_dir, split)
    result = _evaluate_data(embedder, data, settings)
    if output_dir is not None and _is_rank0():
        _write_json(Path(output_dir) / f"{data.name}.json", result)
    return result["metrics"]


def _evaluate_data(embedder, data: BeirData, settings: EvalSettings) -> dict:
    start = time.perf_counter()
    instruction = (
        settings.instruction if settings.instruction is not None else eval_instruction(data.name)
    )
    parts = data.subsets or [data]
    per_part = {}
    for part in parts:
        run = search_run(embedder, part, settings, instruction)
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
    fmt = getattr(getattr(embedder, "settings", None), "prompt_format", None)
    # What queries really got: an encoder saved with prompt_format "none" ignores the instruction.
    applied = query_prefix(instruction, fmt) if fmt else None
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
def _strict(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


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


def _is_rank0() -> bool:
    import torch

    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ----- command line -----------------------------------------------------------------------------
def _init_distributed():
    """Join the torchrun process group (one device per rank); None without torchrun."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    """``conretriever eval --model SPEC (--tasks NAME... | --beir-dir PATH...)``."""
    parser = argparse.ArgumentParser(prog="conretriever eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model dir, HF id or embedded:<name>")
    parser.add_argument("--tasks", nargs="*", default=[], help="MTEB names or beir15 / small")
    parser.add_argument("--beir-dir", nargs="*", default=[], help="local BEIR folders")
    parser.add_argument("--output-dir", default="eval_results")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-max-length", type=int, default=None)
    parser.add_argument("--doc-max-length", type=int, default=None)
    parser.add_argument("--instruction", default=None, help="one instruction for every task")
    parser.add_argument("--cache-dir", default=None, help="default $CONRETRIEVER_CACHE/embeddings")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--split", default=None, help="qrels split of local folders (test)")
    parser.add_argument(
        "--engine",
        choices=["native", "mteb"],
        default="native",
        help="local folders: our metrics (native) or a local mteb task",
    )
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU) | float32 | bfloat16")
    args = parser.parse_args(argv)
    if not args.tasks and not args.beir_dir:
        parser.error("give --tasks and/or --beir-dir")

    from conretriever.modeling import Embedder

    device = _init_distributed()
    rank0 = _is_rank0()
    settings = EvalSettings(
        batch_size=args.batch_size,
        query_max_length=args.query_max_length,
        doc_max_length=args.doc_max_length,
        instruction=args.instruction,
        cache_dir=None if args.no_cache else str(args.cache_dir or default_cache_dir()),
        max_queries=args.max_queries,
        split=args.split,
        show_progress=rank0,
    )
    # Read every folder and look up every task first: a malformed file or a misspelt task name
    # fails in seconds, not after an hour of encoding.
    folders = [load_beir_dir(p, args.split) for p in args.beir_dir]
    named = []
    if args.tasks:
        try:
            named = mteb_tasks(expand_tasks(args.tasks))
        except KeyError as err:
            parser.error(f"--tasks: {err.args[0]}")
    embedder = Embedder.from_pretrained(args.model, dtype=args.dtype, device=device)
    results = []
    for data in folders:
        if args.engine == "mteb" and not data.subsets:
            found = evaluate_with_mteb(embedder, [local_mteb_task(data)], settings, args.model)
            results.append({**found[0], "source": data.source})
        else:
            results.append(_evaluate_data(embedder, data, settings))
        if rank0:
            print(f"{data.name}: nDCG@10 = {100 * results[-1]['metrics'][MAIN_SCORE]:.2f}")
    failed = []
    for task in named:  # one at a time: a task that cannot download does not stop the others
        try:
            results += evaluate_with_mteb(embedder, [task], settings, args.model)
        except (ConnectionError, OSError) as err:
            failed.append(task.metadata.name)
            print(
                f"conretriever eval: {task.metadata.name}: cannot load its data ({err}); "
                "offline? evaluate a local copy with --beir-dir",
                file=sys.stderr,
            )

    if rank0:
        out = Path(args.output_dir)
        for r in results:
            _write_json(out / f"{r['task']}.json", r)
        record = {
            "model": args.model,
            "model_fingerprint": model_fingerprint(embedder),
            "embedder_settings": asdict(embedder.settings),
            "eval_settings": asdict(settings),
            "instructions": {r["task"]: r["metrics"]["instruction"] for r in results},
            "query_prefixes": {
                r["task"]: query_prefix(
                    r["metrics"]["instruction"], embedder.settings.prompt_format
                )
                for r in results
            },
            "seconds_per_task": {r["task"]: r["metrics"]["seconds"] for r in results},
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "argv": sys.argv if argv is None else list(argv),
        }
        _write_json(out / "settings.json", record)
        table = summary_table(results)
        (out / "summary.md").write_text(f"# Retrieval evaluation: `{args.model}`\n\n{table}")
        print(table)
    return 1 if failed else 0
