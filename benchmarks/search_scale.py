"""Search at corpus scale: wall time and peak memory of today's path and the streaming one.

For each corpus size (random unit vectors, dim 1024 by default) the vectors are first written
as an embedding store (``retrieval.store``, what ``encode_corpus`` leaves on disk), then the same
queries are searched two ways, each in a fresh process that reports its own peak resident memory
(``ru_maxrss``):

1. **before** (the code this replaced): every cached row read into a dict of numpy rows, then
   ``np.stack``ed into one float32 matrix, then copied into a faiss ``IndexFlatIP`` and
   searched: about three copies of the corpus matrix. Skipped, with the memory it would need,
   where that exceeds 80% of this machine's RAM;
2. **streaming** (``retrieval.search.search``): blocks of rows read from the store under a
   memory budget (``--memory-gb``), a running top-k per query. Peak memory: budget + start-up.

Both rank the same documents (the top-k overlap is reported: faiss and torch round scores a
little differently, so near-ties can swap at the cut-off). A small encode run with a
tiny random decoder (``--encode-docs``) writes its store the same way (``encode_corpus``).

    python benchmarks/search_scale.py                                # 1e4 .. 4e6, ~15 min CPU
    python benchmarks/search_scale.py --sizes 10000,100000 --queries 100

The table is appended to ``benchmarks/results.md`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results.md"


def write_store(folder: Path, n: int, dim: int, seed: int = 0, chunk: int = 200_000) -> None:
    """An embedding store of ``n`` random unit vectors (keys = row numbers), chunk by chunk."""
    from conretriever.retrieval.store import EmbeddingStore

    store = EmbeddingStore(folder)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        v = rng.standard_normal((rows, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        keys = np.zeros((rows, 16), np.uint8)
        keys[:, :8] = np.arange(start, start + rows, dtype=">u8").view(np.uint8).reshape(rows, 8)
        store.add(keys, v)


def queries(nq: int, dim: int) -> np.ndarray:
    q = np.random.default_rng(1).standard_normal((nq, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def child(mode: str, folder: str, nq: int, dim: int, k: int, memory_gb: float) -> None:
    """Run one search in this (fresh) process; print {seconds, peak_gb} as JSON and save the
    ranked ids beside the store."""
    from conretriever.retrieval.corpus import CorpusVectors
    from conretriever.retrieval.store import EmbeddingStore

    q = queries(nq, dim)
    store = EmbeddingStore(Path(folder))
    tic = time.perf_counter()
    if mode == "before":
        import faiss

        rows: dict[bytes, np.ndarray] = {}
        for shard in store.shards:  # the old lookup: one numpy row object per document
            block = shard.vectors[0 : shard.rows]
            for key, vec in zip(shard.keys, block, strict=True):
                rows[key.tobytes()] = np.array(vec, dtype=np.float32)
        matrix = np.stack(list(rows.values()))
        index = faiss.IndexFlatIP(dim)
        index.add(matrix)
        _, ids = index.search(q, k)
    else:
        from conretriever.retrieval.search import search

        sources = [s.vectors for s in store.shards]
        source = np.concatenate([np.full(s.rows, i, np.int32) for i, s in enumerate(store.shards)])
        row = np.concatenate([np.arange(s.rows) for s in store.shards])
        corpus = CorpusVectors(0, len(row), dim, sources, source, row)
        _, ids = search(q, corpus, k, memory_gb=memory_gb)
    seconds = time.perf_counter() - tic
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    np.save(Path(folder) / f"{mode}_ids.npy", np.asarray(ids, np.int64))
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb}))


def measure(mode: str, folder: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(folder), str(args.queries),
           str(args.dim), str(args.k), str(args.memory_gb)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(folder: Path) -> str:
    """How far the two rankings agree: the share of each query's top-k found by both (faiss
    and torch round scores differently, so near-ties may swap places at the margin)."""
    a = np.load(folder / "before_ids.npy")
    b = np.load(folder / "streaming_ids.npy")
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)])
    return f"{100 * overlap:.3f}% (top-1 equal: {100 * np.mean(a[:, 0] == b[:, 0]):.1f}%)"


def ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def encode_check(args) -> str:
    """encode_corpus of ``--encode-docs`` texts with a tiny random decoder into a store."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_decoder_dir

    from conretriever.model.embedder import Embedder
    from conretriever.retrieval.corpus import encode_corpus

    with tempfile.TemporaryDirectory() as tmp:
        model = Embedder.from_pretrained(make_decoder_dir(Path(tmp) / "m"), device="cpu")
        texts = [f"document {i} " + "word " * (i % 40) for i in range(args.encode_docs)]
        tic = time.perf_counter()
        corpus = encode_corpus(model, texts, cache_dir=Path(tmp) / "store", show_progress=False,
                               memory_gb=args.memory_gb)  # fmt: skip
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        encode_corpus(model, texts, cache_dir=Path(tmp) / "store", show_progress=False)
        cached = time.perf_counter() - tic
    return (
        f"encode part: {args.encode_docs} texts with a tiny random decoder -> store in "
        f"{first:.1f} s ({len(corpus.sources)} shard(s)); rerun from the store {cached:.2f} s"
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, folder, nq, dim, k, gb = sys.argv[2:8]
        child(mode, folder, int(nq), int(dim), int(k), float(gb))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000,4000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--memory-gb", type=float, default=1.0)
    parser.add_argument("--encode-docs", type=int, default=5000)
    parser.add_argument("--work", default=None, help="where the stores go (default: a temp dir)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="search_scale_"))
    rows = []
    for n in [int(float(x)) for x in args.sizes.split(",")]:
        folder = work / f"store_{n}"
        tic = time.perf_counter()
        if not folder.exists():
            write_store(folder, n, args.dim)
        write_s = time.perf_counter() - tic
        matrix_gb = n * args.dim * 4 / 2**30
        if 3 * matrix_gb > 0.8 * ram_gb():
            before = {"skip": f"needs ~{3 * matrix_gb:.0f} GB (3 x {matrix_gb:.1f} GB matrix)"}
        else:
            before = measure("before", folder, args)
        after = measure("streaming", folder, args)
        same = agreement(folder) if "seconds" in before else "-"
        rows.append((n, matrix_gb, write_s, before, after, same))
        print(n, before, after, same, flush=True)
    encode_line = encode_check(args)
    print(encode_line)

    def cell(r: dict) -> str:
        if "skip" in r:
            return f"does not fit: {r['skip']}"
        if "error" in r:
            return f"failed: {r['error'][:60]}"
        return f"{r['seconds']:.1f} s, {r['peak_gb']:.2f} GB"

    lines = [
        f"\n## search at scale ({time.strftime('%Y-%m-%d')})",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores "
        f"({torch.backends.cpu.get_cpu_capability()}), {ram_gb():.0f} GB RAM, "
        f"{'GPU: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"command: `python benchmarks/search_scale.py {' '.join(sys.argv[1:])}`",
        f"{args.queries} queries, top {args.k}, dim {args.dim}, float32 store, streaming budget "
        f"{args.memory_gb} GB; peak = the search process's max resident memory",
        "",
        "| corpus | matrix | before: dict + stack + faiss flat | streaming (ours) "
        "| top-k overlap |",
        "|---|---|---|---|---|",
    ]
    for n, gb, _, before, after, same in rows:
        lines.append(f"| {n:,} | {gb:.2f} GB | {cell(before)} | {cell(after)} | {same} |")
    lines += ["", encode_line, ""]
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a") as handle:
        handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
