"""Helper for tests/test_search.py: evaluate a tiny model on a fixed BEIR folder, under torchrun
(gloo: each rank encodes and searches its slice of the corpus) or as one plain process.

usage: search_dist_check.py MODEL_DIR OUT.json [CACHE_DIR]
Writes OUT.json (one process) or OUT.json.rank<r> (each torchrun rank): the metrics, how many
texts this process encoded, and how many bytes it sent to the top-k gathers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def write_folder(root: Path) -> Path:
    """41 documents (an odd count: uneven slices), 9 queries with graded judgements."""
    folder = root / "scifact"  # a known task: its instruction and split rules apply
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": f"t{i % 5}", "text": f"doc {i} " + "word " * (i % 7)}
            for i in range(41)]  # fmt: skip
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{i}", "text": f"doc {i * 4} word"} for i in range(9)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    qrels = "".join(f"q{i}\td{i * 4}\t1\nq{i}\td{i * 4 + 1}\t2\n" for i in range(9))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    return folder


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    cache_dir = sys.argv[3] if len(sys.argv) > 3 else None
    from conretriever import runtime
    from conretriever.evaluation.evaluate import evaluate_beir_dir
    from conretriever.model.embedder import Embedder
    from conretriever.retrieval import search

    info = runtime.init_distributed()
    model = Embedder.from_pretrained(model_dir, device="cpu")
    seen = []
    original = model.encode

    def counting_encode(batch, *args, **kwargs):
        seen.extend(batch)
        return original(batch, *args, **kwargs)

    model.encode = counting_encode
    sent = [0]  # bytes this rank sends in the top-k merge's all_gathers
    merge = search._gather_ranks

    def counting_merge(best, k):
        import torch

        real = torch.distributed.all_gather

        def count(pieces, tensor, *args, **kwargs):
            sent[0] += tensor.numel() * tensor.element_size()
            return real(pieces, tensor, *args, **kwargs)

        torch.distributed.all_gather = count
        try:
            return merge(best, k)
        finally:
            torch.distributed.all_gather = real

    search._gather_ranks = counting_merge
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp))
        metrics = evaluate_beir_dir(model, folder, batch_size=4, cache_dir=cache_dir,
                                    show_progress=False)  # fmt: skip
    record = {
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, float) and k != "seconds"},
        "encoded": len(seen),
        "gathered_bytes": sent[0],
        "n_queries": 9,
        "k": 41,  # top_k 1000 capped at the corpus size
    }
    path = out if info.world_size == 1 else f"{out}.rank{info.rank}"
    Path(path).write_text(json.dumps(record))
    runtime.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("CONRETRIEVER_CPU_BF16", "0")
    main()
