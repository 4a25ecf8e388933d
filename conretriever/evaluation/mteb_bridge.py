"""MTEB bridge: run mteb 2.x retrieval tasks on an Embedder, ranking exactly as the native path.

``conretriever eval --tasks NAME`` (and ``--engine mteb`` on a local folder) hand the scoring to
``mteb.evaluate``. Three pieces make mteb's numbers comparable with our own
(``conretriever.evaluation.evaluate``, metrics from ``conretriever.evaluation.metrics``):

1. :func:`mteb_model` wraps the Embedder as an mteb ``AbsEncoder`` that also implements mteb's
   search protocol (``index`` the corpus, then ``search`` queries). Indexing goes through our
   cached, sharded corpus encoding and searching through our exact inner-product search
   (``conretriever.retrieval.search``), so mteb ranks the same documents in the same order as
   :func:`conretriever.evaluation.evaluate.search_run`, and the corpus cache serves both paths.
   Queries get the task's e5 instruction (``conretriever.data.tasks.eval_instruction``, or
   ``EvalSettings.instruction``); documents get none.
2. :func:`local_mteb_task` turns a :class:`~conretriever.data.beir.BeirData` into an offline mteb
   retrieval task (no download, no hub), with MTEB's self-match rule for the task
   (``IGNORE_IDENTICAL_IDS``). Running a local folder both ways is the cross-check that our
   numpy metrics equal mteb's.
3. :func:`evaluate_with_mteb` runs the tasks one at a time (mteb's result cache off) and returns
   the same result dicts as the native path: ``task``, ``split``, ``engine``, ``main_score`` and
   ``metrics`` (every numeric score mteb reports, plus ``instruction`` and ``seconds``). Named
   tasks come from :func:`mteb_tasks`.

mteb (and ``datasets``) are imported only inside these functions: the package, the trainer and
the offline evaluation import without them, and the GPU machines do not have them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np

from conretriever.data.beir import IGNORE_IDENTICAL_IDS, BeirData, document_text
from conretriever.data.tasks import eval_instruction
from conretriever.evaluation.metrics import MAIN_SCORE
from conretriever.retrieval.corpus import CorpusVectors, encode_corpus, encode_sharded
from conretriever.retrieval.search import search


class EvalSettings(Protocol):
    """What the bridge reads of ``conretriever.evaluation.evaluate.EvalSettings``."""

    batch_size: int
    instruction: str | None
    progress: bool
    store_dtype: str
    search_memory_gb: float

    def resolved_cache_dir(self) -> Path | None: ...


class _Bridge:
    """What the mteb model does, without mteb: encode texts by role, index a corpus (cached,
    sharded), search it exactly. :func:`mteb_model` puts mteb's interface on it."""

    def __init__(self, embedder, settings: EvalSettings):
        self.embedder, self.settings = embedder, settings
        self.corpus_ids: list[str] = []
        self.corpus: CorpusVectors | None = None

    def instruction_for(self, task_name: str) -> str:
        if self.settings.instruction is not None:
            return self.settings.instruction
        return eval_instruction(task_name)

    def encode(self, texts: list[str], task_name: str, is_query: bool) -> np.ndarray:
        s = self.settings
        return encode_sharded(
            self.embedder,
            texts,
            role="query" if is_query else "passage",
            instruction=self.instruction_for(task_name) if is_query else None,
            batch_size=s.batch_size,
            show_progress=s.progress,
        )

    def index(self, corpus) -> None:
        titles = corpus["title"] if "title" in corpus.column_names else [None] * len(corpus)
        texts = [document_text(title, t) for t, title in zip(corpus["text"], titles, strict=True)]
        self.corpus_ids = [str(i) for i in corpus["id"]]
        self.corpus = encode_corpus(
            self.embedder,
            texts,
            batch_size=self.settings.batch_size,
            cache_dir=self.settings.resolved_cache_dir(),
            store_dtype=self.settings.store_dtype,
            show_progress=self.settings.progress,
            memory_gb=self.settings.search_memory_gb,
        )

    def search(self, queries, task_name: str, top_k: int) -> dict[str, dict[str, float]]:
        query_emb = self.encode(list(queries["text"]), task_name, is_query=True)
        scores, indices = search(
            query_emb, self.corpus, top_k, memory_gb=self.settings.search_memory_gb
        )
        return {
            str(qid): {self.corpus_ids[i]: float(s) for s, i in zip(srow, irow, strict=True)}
            for qid, srow, irow in zip(queries["id"], scores, indices, strict=True)
        }


def mteb_model(embedder, settings: EvalSettings, name: str = "conretriever/model"):
    """An mteb model for ``embedder``: an ``AbsEncoder`` (``prompt_type`` tells query from
    document) that also implements mteb's search protocol (``index``/``search``) with our cached
    corpus encoding and exact search, so mteb tasks rank exactly as :func:`search_run` does."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    bridge = _Bridge(embedder, settings)

    class ConRetrieverMteb(AbsEncoder):
        def __init__(self):
            meta = {"name": name, "similarity_fn_name": ScoringFunction.COSINE,
                    "embed_dim": getattr(embedder, "dim", None)}  # fmt: skip
            self.mteb_model_meta = ModelMeta.create_empty(overwrites=meta)

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kw):
            texts = [t for batch in inputs for t in batch["text"]]
            return bridge.encode(texts, task_metadata.name, prompt_type == PromptType.query)

        def index(self, corpus, *, task_metadata, hf_split, hf_subset, **kw) -> None:
            bridge.index(corpus)

        def search(self, queries, *, task_metadata, hf_split, hf_subset, top_k, **kw):
            return bridge.search(queries, task_metadata.name, top_k)

    return ConRetrieverMteb()


def local_mteb_task(data: BeirData):
    """A BEIR folder as an offline ``mteb`` retrieval task (no download, no hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    if data.subsets:
        raise ValueError(f"{data.source}: use the native engine for a folder of BEIR folders")
    metadata = TaskMetadata(
        name=data.name,
        dataset={"path": data.source, "revision": "local"},
        description=f"local BEIR folder {data.source}",
        reference=None,
        type="Retrieval",
        category="t2t",
        modalities=["text"],
        eval_splits=[data.split],
        eval_langs=["eng-Latn"],
        main_score=MAIN_SCORE,
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )

    class LocalBeirTask(AbsTaskRetrieval):
        ignore_identical_ids = data.name in IGNORE_IDENTICAL_IDS

        def load_data(self, **kwargs) -> None:
            corpus = Dataset.from_dict(
                {
                    "id": data.corpus_ids,
                    "text": data.corpus_texts,
                    "title": [""] * len(data.corpus_ids),
                }
            )
            qids = list(data.queries)
            queries = Dataset.from_dict({"id": qids, "text": [data.queries[q] for q in qids]})
            split = RetrievalSplitData(
                corpus=corpus, queries=queries, relevant_docs=data.qrels, top_ranked=None
            )
            self.dataset = {"default": {data.split: split}}
            self.data_loaded = True

    LocalBeirTask.metadata = metadata
    return LocalBeirTask()


def evaluate_with_mteb(
    embedder, tasks: list, settings: EvalSettings, model_name: str
) -> list[dict]:
    """Run mteb tasks (named or :func:`local_mteb_task`) -> one result dict per task."""
    import mteb

    results = []
    for task in tasks:
        start = time.perf_counter()
        model = mteb_model(embedder, settings, model_name)
        out = mteb.evaluate(
            model,
            [task],
            cache=None,
            encode_kwargs={"batch_size": settings.batch_size},
            show_progress_bar=settings.progress,
        )
        task_result = out.task_results[0]
        split = next(iter(task_result.scores))
        scores = dict(task_result.scores[split][0])
        metrics = {k: v for k, v in scores.items() if isinstance(v, int | float)}
        metrics["instruction"] = (
            settings.instruction
            if settings.instruction is not None
            else eval_instruction(task.metadata.name)
        )
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        results.append(
            {
                "task": task.metadata.name,
                "source": "mteb",
                "split": split,
                "engine": "mteb",
                "main_score": task.metadata.main_score,
                "metrics": metrics,
            }
        )
    return results


def mteb_tasks(names: list[str]) -> list:
    """mteb task objects for MTEB task names; metadata only, the data downloads when a task runs.
    An unknown name raises ``KeyError`` (the CLI reports it before loading the model)."""
    import mteb

    return [mteb.get_task(name) for name in names]
