"""Helper for tests/test_search.py: evaluate one BEIR folder whose corpus matrix is larger than
the memory this process may allocate.

usage: memory_limit_check.py WORK_DIR inmemory|limited

``inmemory``: the whole corpus matrix in memory, ranked by ``exact_search`` over it, scored
(today's path, no limit). ``limited``: ``RLIMIT_DATA`` (heap and anonymous memory; memory-mapped
files do not count) set to what the process uses after start-up plus less than the corpus
matrix, then ``evaluate_beir_dir`` with an on-disk store and a 16 MB search budget. Prints one
JSON line: the metrics and the sizes involved.
"""

from __future__ import annotations

import json
import resource
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

N_DOCS, DIM, N_QUERIES = 40_000, 1536, 50  # corpus matrix: 40k x 1536 x 4 B = 246 MB
HEADROOM = 150 << 20  # the limited run may allocate this much beyond start-up: < the matrix


class HashEmbedder(nn.Module):
    """text -> a fixed random unit vector (seeded by the text), in float32; no model needed."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    @property
    def dim(self) -> int:
        return DIM

    def encode(self, texts, role="passage", instruction=None, batch_size=256, max_length=None,
               show_progress=None):  # fmt: skip
        out = np.empty((len(texts), DIM), np.float32)
        for i, text in enumerate(texts):
            v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(DIM)
            out[i] = v / np.linalg.norm(v)
        return out


def write_folder(root: Path) -> Path:
    folder = root / "bigcorpus"
    if (folder / "qrels" / "test.tsv").exists():
        return folder
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as handle:
        for i in range(N_DOCS):
            handle.write(json.dumps({"_id": f"d{i}", "text": f"document {i}"}) + "\n")
    queries = [{"_id": f"q{i}", "text": f"document {i * 97}"} for i in range(N_QUERIES)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\td{i * 97}\t1\nq{i}\td{i * 97 + 1}\t1\n" for i in range(N_QUERIES))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def data_bytes() -> int:
    """VmData of this process: its heap and anonymous mappings (what RLIMIT_DATA limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def main() -> None:
    work, mode = Path(sys.argv[1]), sys.argv[2]
    from conretriever.data.beir import load_beir_dir
    from conretriever.evaluation.evaluate import evaluate_beir_dir
    from conretriever.evaluation.metrics import retrieval_metrics
    from conretriever.retrieval.search import exact_search

    folder = write_folder(work)
    data = load_beir_dir(folder)
    model = HashEmbedder()
    record = {"corpus_bytes": N_DOCS * DIM * 4}
    if mode == "inmemory":
        qids = list(data.qrels)
        docs = model.encode(data.corpus_texts)  # the whole matrix at once
        queries = model.encode([data.queries[q] for q in qids], role="query")
        scores, idx = exact_search(queries, docs, 1000)
        run = {q: {data.corpus_ids[i]: float(s) for s, i in zip(srow, irow, strict=True)}
               for q, srow, irow in zip(qids, scores, idx, strict=True)}  # fmt: skip
        metrics = retrieval_metrics(data.qrels, run)
    else:
        baseline = data_bytes()
        limit = baseline + HEADROOM
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        record.update(baseline_bytes=baseline, limit_bytes=limit)
        try:  # the limit really binds: the whole matrix cannot be allocated
            np.ones((N_DOCS, DIM), np.float32)
            raise SystemExit("the limit did not bind")
        except MemoryError:
            pass
        metrics = evaluate_beir_dir(model, data, cache_dir=work / "store", show_progress=False,
                                    search_memory_gb=16 / 1024)  # fmt: skip
        metrics = {k: v for k, v in metrics.items() if k not in ("seconds", "instruction",
                                                                 "query_prefix")}  # fmt: skip
    record["metrics"] = {k: round(float(v), 12) for k, v in metrics.items()}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
