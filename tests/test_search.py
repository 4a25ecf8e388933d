"""retrieval: streaming exact top-k (ties included, any block size), the verified on-disk store,
the fingerprint, approximate indices, bounded memory, and sharded search under torchrun giving
the same results as one process while gathering only the top-k."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conretriever.retrieval import search as search_mod
from conretriever.retrieval.corpus import encode_corpus, model_fingerprint
from conretriever.retrieval.search import exact_search, search

REPO = Path(__file__).resolve().parents[1]


class CountingEmbedder(nn.Module):
    """Deterministic text -> unit vector (from a hash of the text), recording every text encoded.
    The weight is a real parameter so the fingerprint sees it."""

    def __init__(self, dim: int = 8, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), scale))
        self.encoded: list[str] = []

    @property
    def dim(self) -> int:
        return self.weight.numel()

    def encode(self, texts, role="query", instruction=None, batch_size=32, max_length=None,
               show_progress=None):  # fmt: skip
        self.encoded += list(texts)
        rows = []
        for text in texts:
            rng = np.random.default_rng(zlib.crc32(text.encode()))
            v = rng.standard_normal(self.dim) * self.weight.detach().numpy()
            rows.append(v / np.linalg.norm(v))
        return np.array(rows, dtype=np.float32).reshape(len(texts), self.dim)


def reference_topk(q: np.ndarray, d: np.ndarray, k: int):
    """Brute force: score descending, ties by lower document index."""
    scores = q @ d.T
    order = np.array([sorted(range(len(d)), key=lambda j: (-row[j], j))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("rows_per_block", [7, 60, 1000])
def test_streaming_search_matches_brute_force_including_ties(monkeypatch, rows_per_block):
    rng = np.random.default_rng(0)
    # Integer-valued vectors make many exact ties, also across the top-k cut-off and across
    # block boundaries.
    d = rng.integers(-1, 2, size=(60, 4)).astype(np.float32)
    q = rng.integers(-1, 2, size=(7, 4)).astype(np.float32)
    monkeypatch.setattr(search_mod, "block_rows", lambda *a: rows_per_block)
    scores, idx = exact_search(q, d, 10)
    ref_scores, ref_idx = reference_topk(q, d, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    # k larger than the corpus returns the whole corpus, ranked
    assert exact_search(q, d[:5], 100)[1].shape == (7, 5)
    # query blocks change nothing either
    from conretriever.retrieval.corpus import CorpusVectors

    s2, i2 = search(q, CorpusVectors.from_array(d), 10, query_block=3)
    np.testing.assert_array_equal(i2, ref_idx)


def test_faiss_flat_and_streaming_search_agree():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    d = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    index = faiss.IndexFlatIP(16)
    index.add(d)
    f_scores, f_idx = index.search(q, 20)
    t_scores, t_idx = exact_search(q, d, 20)
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(f_scores, t_scores, rtol=1e-5, atol=1e-5)


def test_block_rows_follow_the_budget_not_the_corpus():
    small = search_mod.block_rows(1024, 4096, 1000, 1.0)
    large = search_mod.block_rows(1024, 4096, 1000, 4.0)
    assert 1000 < small < large  # rows per block grow with the budget only
    per_row = 1024 * 4 + 4096 * 16
    assert small * per_row <= 2**30  # the block and its scores fit 1 GiB


def test_cache_encodes_only_missing_texts(tmp_path):
    model = CountingEmbedder()
    texts = ["alpha", "beta", "gamma", "beta"]  # a duplicate is encoded once
    first = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False).to_array()
    assert sorted(model.encoded) == ["alpha", "beta", "gamma"]
    np.testing.assert_array_equal(first, model.encode(texts))
    model.encoded.clear()
    again = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False).to_array()
    assert model.encoded == []
    np.testing.assert_array_equal(again, first)
    # an overlapping corpus (another query set, a grown corpus) encodes only what is new
    more = encode_corpus(model, ["delta", "alpha"], cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["delta"]
    np.testing.assert_array_equal(more.to_array()[1], first[0])
    # a different length limit is a different key
    model.encoded.clear()
    encode_corpus(model, ["alpha"], max_length=7, cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["alpha"]


def test_changed_weights_miss_the_cache(tmp_path):
    model = CountingEmbedder()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    with torch.no_grad():
        model.weight.mul_(2.0)
    model.encoded.clear()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["alpha"]


def _store(tmp_path: Path) -> Path:
    (store,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return store


def test_half_written_shard_is_ignored(tmp_path):
    model = CountingEmbedder()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    (meta,) = _store(tmp_path).glob("*.json")
    meta.unlink()  # as if killed before the shard's last file was written
    model.encoded.clear()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["alpha"]
    assert not list(_store(tmp_path).glob(".*.tmp"))


def test_corrupt_shard_is_detected_and_its_texts_encoded_again(tmp_path, caplog):
    model = CountingEmbedder()
    texts = [f"text {i}" for i in range(20)]
    good = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False).to_array()
    (emb,) = _store(tmp_path).glob("*.emb.npy")
    raw = bytearray(emb.read_bytes())
    raw[-40:-8] = bytes(32)  # same size, some vector bytes zeroed
    emb.write_bytes(bytes(raw))
    model.encoded.clear()
    with caplog.at_level(logging.WARNING):
        again = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False).to_array()
    assert f"skipping shard {emb}" in caplog.text and "checksum mismatch" in caplog.text
    assert sorted(model.encoded) == sorted(texts)  # all its texts encoded again
    np.testing.assert_array_equal(again, good)  # the right vectors, not the corrupt ones


def test_truncated_shard_is_skipped_by_name(tmp_path, caplog):
    model = CountingEmbedder()
    encode_corpus(model, ["alpha", "beta"], cache_dir=tmp_path, show_progress=False)
    (emb,) = _store(tmp_path).glob("*.emb.npy")
    emb.write_bytes(emb.read_bytes()[:100])
    model.encoded.clear()
    with caplog.at_level(logging.WARNING):
        out = encode_corpus(model, ["alpha", "beta"], cache_dir=tmp_path, show_progress=False)
    assert "skipping shard" in caplog.text and emb.stem.split(".")[0] in caplog.text
    assert sorted(model.encoded) == ["alpha", "beta"]
    np.testing.assert_array_equal(out.to_array(), model.encode(["alpha", "beta"]))


def test_a_cache_that_cannot_be_written_warns_and_the_run_finishes(tmp_path, caplog, monkeypatch):
    import shutil
    from collections import namedtuple

    model = CountingEmbedder()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 1000))  # "disk full"
    with caplog.at_level(logging.WARNING):
        out = encode_corpus(model, ["alpha", "beta"], cache_dir=tmp_path, show_progress=False)
    assert "cannot write" in caplog.text and "goes on without caching" in caplog.text
    np.testing.assert_array_equal(out.to_array(), model.encode(["alpha", "beta"]))
    assert not list(tmp_path.rglob("*.json"))


def test_float16_store_halves_the_bytes_within_rounding(tmp_path):
    model = CountingEmbedder(dim=64)
    texts = [f"t{i}" for i in range(50)]
    exact = model.encode(texts)
    out = encode_corpus(model, texts, cache_dir=tmp_path, store_dtype="float16",
                        show_progress=False)  # fmt: skip
    (emb,) = _store(tmp_path).glob("*.emb.npy")
    assert np.load(emb, mmap_mode="r").dtype == np.float16
    got = out.to_array()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact, atol=1e-3)
    again = encode_corpus(model, texts, cache_dir=tmp_path, store_dtype="float16",
                          show_progress=False).to_array()  # fmt: skip
    np.testing.assert_array_equal(again, got)  # the cached run sees what the first one did


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_index_recall_against_exact(kind):
    pytest.importorskip("faiss")
    from conretriever.retrieval.corpus import CorpusVectors
    from conretriever.retrieval.search import build_index, index_search, recall_at_k

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 32))
    d = centers[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 32))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    q = d[rng.choice(4000, 50, replace=False)] + 0.05 * rng.standard_normal((50, 32))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    corpus = CorpusVectors.from_array(d)
    _, exact = search(q, corpus, 100)
    _, approx = index_search(build_index(corpus, kind), q, corpus, 100)
    recall = recall_at_k(approx, exact)
    assert recall > {"ivf": 0.9, "hnsw": 0.99, "ivfpq": 0.5}[kind], recall
    assert recall_at_k(exact, exact) == 1.0


def test_fingerprint_sees_one_changed_value_in_a_large_tensor():
    big = nn.Module()
    big.weight = nn.Parameter(torch.randn(400, 400))  # 160k values: sampled + summed, not hashed
    before = model_fingerprint(big)
    assert model_fingerprint(big) == before
    with torch.no_grad():
        big.weight[123, 7] += 0.01  # not on the sample stride
    assert model_fingerprint(big) != before


def test_fingerprint_of_an_embedder_changes_with_weights_and_settings(tiny_decoder):
    from conretriever.model.embedder import Embedder

    model = Embedder.from_pretrained(tiny_decoder, device="cpu")
    base = model_fingerprint(model)
    model.settings.doc_max_length = 64
    assert model_fingerprint(model) != base
    model.settings.doc_max_length = 512
    assert model_fingerprint(model) == base
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_fingerprint(model) != base


@pytest.mark.slow
def test_two_process_search_equals_one_process_and_gathers_only_the_topk(tiny_decoder, tmp_path):
    """torchrun x 2 (gloo): every rank encodes and searches its half; the metrics equal one
    process's, and what each rank sent is the per-query top-k only."""
    script = Path(__file__).with_name("search_dist_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(script), str(tiny_decoder), str(single)], check=True,
                   env=env, timeout=300)  # fmt: skip
    multi = tmp_path / "multi.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29600 + os.getpid() % 1000)]  # fmt: skip
    subprocess.run([*torchrun, str(script), str(tiny_decoder), str(multi), str(tmp_path / "c")],
                   check=True, env=env, timeout=300)  # fmt: skip
    one = json.loads(single.read_text())
    for rank in (0, 1):
        got = json.loads(Path(f"{multi}.rank{rank}").read_text())
        assert got["metrics"] == pytest.approx(one["metrics"], abs=1e-9)
        assert got["encoded"] < one["encoded"]  # each rank encoded its half only
        n_queries, k = got["n_queries"], got["k"]
        assert got["gathered_bytes"] == n_queries * k * (4 + 8)  # float32 scores + int64 ids


def test_evaluation_under_a_memory_limit_smaller_than_the_corpus(tmp_path):
    """A corpus matrix bigger than the process may allocate (RLIMIT_DATA) is still evaluated,
    streamed from the store, with exactly the metrics of the in-memory path."""
    script = Path(__file__).with_name("memory_limit_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    free = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "inmemory"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    limited = subprocess.run([sys.executable, str(script), str(tmp_path), "limited"],
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert limited.returncode == 0, limited.stderr[-2000:]
    a, b = json.loads(free.stdout.splitlines()[-1]), json.loads(limited.stdout.splitlines()[-1])
    assert b["corpus_bytes"] > b["limit_bytes"] - b["baseline_bytes"]  # it could not fit
    assert a["metrics"] == b["metrics"]
