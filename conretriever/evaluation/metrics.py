"""Metrics: how well a retrieval run ranks the judged documents, scored the way MTEB scores it.

MTEB 2.x takes its retrieval metrics from ``trec_eval`` (via ``pytrec_eval``). This module computes
the same numbers in numpy, so the offline evaluation needs neither mteb nor pytrec_eval (the GPU
machines have neither); a test pins it to mteb's own evaluator on random runs with ties and
graded labels. The definitions, for one query with ``R`` relevant documents (grade >= 1):

* **Order**: the run is sorted by score descending, ties by document id descending (trec_eval's
  rule), and cut at the largest k.
* **nDCG@k** = DCG@k / ideal DCG@k, gains = the qrels grades (unjudged or negative = 0), discount
  ``1 / log2(rank + 1)`` with ranks from 1; the ideal ranking sorts all positive grades.
* **MAP@k**: the sum of precision at the rank of each relevant hit within k, divided by ``R``
  (not by k, nor by the hits found).
* **recall@k** = hits in the top k / ``R``; **P@k** = hits in the top k / k.
* **MRR@k** = 1 / rank of the first relevant hit if it is within k, else 0 (MTEB's own).

Each metric is averaged over the queries that have a relevant document and a non-empty ranking;
the others are left out, as trec_eval scores only queries present in both (no query left: NaN).
All values are fractions in [0, 1] (tables show them x100); nDCG@10 (``MAIN_SCORE``) is the
headline number.
"""

from __future__ import annotations

import numpy as np

# mteb's retrieval cut-offs (AbsTaskRetrieval.k_values); 1000 is also the search depth.
K_VALUES = (1, 3, 5, 10, 20, 100, 1000)
MAIN_SCORE = "ndcg_at_10"


def retrieval_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    k_values: tuple[int, ...] = K_VALUES,
) -> dict[str, float]:
    """MTEB/trec_eval retrieval metrics averaged over queries (see the module docstring).

    ``run``: query id -> {doc id: score}. Averages over queries that have a relevant document and
    a non-empty ranking (trec_eval scores only queries present in both). Keys: ``ndcg_at_k``,
    ``map_at_k``, ``recall_at_k``, ``precision_at_k``, ``mrr_at_k``, plus ``n_queries``.
    """
    sums = {
        f"{m}_at_{k}": 0.0 for m in ("ndcg", "map", "recall", "precision", "mrr") for k in k_values
    }
    n = 0
    top = max(k_values)
    for qid, ranking in run.items():
        grades = qrels.get(qid, {})
        n_rel = sum(1 for g in grades.values() if g >= 1)
        if n_rel == 0 or not ranking:
            continue
        n += 1
        # trec_eval order: score descending, then doc id descending.
        ranked = sorted(ranking.items(), key=lambda item: (item[1], item[0]), reverse=True)[:top]
        gains = np.array([max(grades.get(doc, 0), 0) for doc, _ in ranked], dtype=np.float64)
        hits = gains >= 1
        discounts = 1.0 / np.log2(np.arange(2, len(gains) + 2))
        ideal = np.sort(np.array([g for g in grades.values() if g > 0], dtype=np.float64))[::-1]
        ideal_discounts = 1.0 / np.log2(np.arange(2, len(ideal) + 2))
        hit_ranks = np.flatnonzero(hits)
        precision_at_hits = np.cumsum(hits)[hit_ranks] / (hit_ranks + 1)
        for k in k_values:
            dcg = float((gains[:k] * discounts[:k]).sum())
            idcg = float((ideal[:k] * ideal_discounts[:k]).sum())
            n_hits = int(hits[:k].sum())
            sums[f"ndcg_at_{k}"] += dcg / idcg if idcg > 0 else 0.0
            sums[f"map_at_{k}"] += float(precision_at_hits[hit_ranks < k].sum()) / n_rel
            sums[f"recall_at_{k}"] += n_hits / n_rel
            sums[f"precision_at_{k}"] += n_hits / k
            first = hit_ranks[0] if len(hit_ranks) else None
            sums[f"mrr_at_{k}"] += 1.0 / (first + 1) if first is not None and first < k else 0.0
    metrics = {key: (value / n if n else float("nan")) for key, value in sums.items()}
    metrics["n_queries"] = n
    return metrics
