"""Evaluation during training, and the best checkpoint of a run.

With ``eval_data`` (local BEIR folders) and ``eval_steps`` N, the in-training model is evaluated
every N steps and after the last one, with the same code as ``conretriever eval``
(``evaluation.evaluate``: the task's e5 instruction, the model's lengths, MTEB's metrics), in
eval mode, without a cache (the weights change). A large folder is watched cheaply through a
fixed subset (:func:`subset`): the first ``eval_max_queries`` judged queries (in qrels order, as
``--max_queries`` takes them) and ``eval_max_docs`` documents (their relevant ones, then a
seeded sample of the rest), the same subset at every evaluation.

The trajectory is untouched: the RNG states (torch CPU/CUDA, Python, numpy) are saved before an
evaluation and restored after it, and nothing else the loop reads changes, so a run with
evaluation gives bit-identical losses and weights to one without. Under FSDP2 every rank
evaluates together: the corpus encoding is sharded over ranks (each its slice, as many
forwards as the others) and the top-k is merged across them.

Best model: ``metric_for_best_model`` (``ndcg_at_10`` = the average over the eval folders, or
``eval/<task>/<metric>`` for one). Each new best is saved as ``checkpoint-best/`` (a checkpoint
like the others, never rotated away) when ``keep_best``; ``export: best`` exports it as
``final/``. The record (step, score) is kept in ``trainer_state.json`` in the run folder and in
every checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from conretriever import runtime
from conretriever.data.beir import BeirData, load_beir_dir
from conretriever.errors import ConfigError
from conretriever.evaluation.evaluate import evaluate_beir_dir

log = logging.getLogger("conretriever.train")

BEST_NAME = "checkpoint-best"
STATE_FILE = "trainer_state.json"
HEADLINE = ("ndcg_at_10", "recall_at_10", "mrr_at_10", "recall_at_100")


def subset(data: BeirData, max_queries: int | None, max_docs: int | None, seed: int) -> BeirData:
    """A fixed subset of a BEIR folder (see the module docstring); the whole when both None."""
    if data.subsets:
        raise ConfigError(
            f"{data.source}: eval_data takes single BEIR folders, not a folder of them"
        )
    qids = [
        q for q in data.qrels if q in data.queries and any(g >= 1 for g in data.qrels[q].values())
    ]
    if max_queries is not None:
        qids = qids[:max_queries]
    qrels = {q: data.qrels[q] for q in qids}
    keep = np.arange(len(data.corpus_ids))
    if max_docs is not None and max_docs < len(keep):
        index = {d: i for i, d in enumerate(data.corpus_ids)}
        relevant = sorted({index[d] for q in qids for d in qrels[q] if d in index})
        rest = np.setdiff1d(keep, relevant)
        extra = max(0, max_docs - len(relevant))
        picked = np.random.default_rng(seed).choice(rest, min(extra, len(rest)), replace=False)
        keep = np.sort(np.concatenate([relevant, picked]).astype(np.int64))
    ids = [data.corpus_ids[i] for i in keep]
    texts = [data.corpus_texts[i] for i in keep]
    return BeirData(data.name, ids, texts, {q: data.queries[q] for q in qids}, qrels,
                    data.split, data.source)  # fmt: skip


class Monitor:
    """Evaluation during training and the best-model record of one run."""

    def __init__(self, cfg, out: Path):
        e = cfg.evaluation
        self.cfg, self.out = cfg, out
        self.folders = [
            subset(load_beir_dir(p), e.eval_max_queries, e.eval_max_docs, cfg.train.seed)
            for p in e.eval_data
        ]
        names = [f.name for f in self.folders]
        if len(set(names)) != len(names):
            raise ConfigError(f"--eval_data: two folders share a task name ({names})")
        self.best: dict | None = None  # {"step", "score", "metric"}

    @property
    def enabled(self) -> bool:
        return bool(self.folders) and self.cfg.evaluation.eval_steps > 0

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.evaluation.eval_steps
        return self.enabled and (step % every == 0 or step == total)

    def evaluate(self, model, step: int) -> dict:
        """One evaluation of the in-training model: ``{"step", "eval/<task>/<metric>", ...,
        "eval/average/<metric>"}`` (fractions, like ``conretriever eval``'s JSON)."""
        e = self.cfg.evaluation
        row: dict = {"step": step}
        per_task = {}
        with runtime.preserved_rng(), torch.no_grad():
            for data in self.folders:
                m = evaluate_beir_dir(model, data, batch_size=e.eval_batch_size, cache_dir=None,
                                      show_progress=False)  # fmt: skip
                per_task[data.name] = m
                row.update({f"eval/{data.name}/{k}": m[k] for k in HEADLINE})
        for k in HEADLINE:
            row[f"eval/average/{k}"] = float(np.mean([m[k] for m in per_task.values()]))
        return row

    def score(self, row: dict) -> float:
        metric = self.cfg.evaluation.metric_for_best_model
        key = metric if metric.startswith("eval/") else f"eval/average/{metric}"
        if key not in row:
            known = sorted(k for k in row if "/" in k)
            raise ConfigError(f"--metric_for_best_model {metric!r}: not among {known}")
        return float(row[key])

    def improved(self, row: dict) -> bool:
        """Record ``row`` if it beats the best so far (higher is better); True when it did."""
        score = self.score(row)
        if self.best is not None and score <= self.best["score"]:
            return False
        self.best = {"step": row["step"], "score": score,
                     "metric": self.cfg.evaluation.metric_for_best_model}  # fmt: skip
        if runtime.is_main():
            (self.out / STATE_FILE).write_text(json.dumps({"best": self.best}, indent=2) + "\n")
        return True

    def restore(self, checkpoint_dir: Path) -> None:
        """The best record as it was when ``checkpoint_dir`` was saved (resume)."""
        try:
            self.best = json.loads((checkpoint_dir / STATE_FILE).read_text()).get("best")
        except (OSError, ValueError):
            self.best = None
