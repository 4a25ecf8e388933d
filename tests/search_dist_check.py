"""Helper for tests/test_search.py: encode a fixed corpus with encode_corpus, under torchrun
(gloo, one shard per rank) or as one plain process.

usage: search_dist_check.py MODEL_DIR OUT.npy [CACHE_DIR]
Writes OUT.npy (one process) or OUT.rank<r>.npy (each torchrun rank) and prints how many texts
this process encoded.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    cache_dir = sys.argv[3] if len(sys.argv) > 3 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    from conretriever.model.embedder import Embedder
    from conretriever.retrieval.search import encode_corpus

    model = Embedder.from_pretrained(model_dir, device="cpu")
    # 23 texts of varied length: uneven split over 2 ranks (11 + 12, the short one padded),
    # several length-sorted batches.
    texts = [f"doc {i} " + "word " * (i % 7) + "end" for i in range(23)]
    seen = []
    original = model.encode

    def counting_encode(batch, *args, **kwargs):
        seen.extend(batch)
        return original(batch, *args, **kwargs)

    model.encode = counting_encode
    emb = encode_corpus(model, texts, batch_size=4, cache_dir=cache_dir, show_progress=False)
    if world > 1:
        rank = torch.distributed.get_rank()
        np.save(out.replace(".npy", f".rank{rank}.npy"), emb)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    else:
        np.save(out, emb)
    print(f"encoded {len(seen)} texts")


if __name__ == "__main__":
    main()
