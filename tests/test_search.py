"""search.py: exact top-k (ties included), the corpus embedding cache, the fingerprint, and
sharded encoding under torchrun giving the same matrix as one process."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conretriever.retrieval import search
from conretriever.retrieval.search import encode_corpus, exact_search, model_fingerprint


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
        return np.array(rows, dtype=np.float32)


def reference_topk(q: np.ndarray, d: np.ndarray, k: int):
    """Brute force: score descending, ties by lower document index."""
    scores = q @ d.T
    order = np.array([sorted(range(len(d)), key=lambda j: (-row[j], j))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), order


def test_torch_search_matches_brute_force_including_ties(monkeypatch):
    rng = np.random.default_rng(0)
    # Integer-valued vectors make many exact ties, also across the top-k cut-off.
    d = rng.integers(-1, 2, size=(60, 4)).astype(np.float32)
    q = rng.integers(-1, 2, size=(7, 4)).astype(np.float32)
    monkeypatch.setattr(search, "_faiss", lambda: None)
    monkeypatch.setattr(search, "_SCORE_BLOCK", 60 * 3)  # 3 query rows per chunk: chunking runs
    scores, idx = exact_search(q, d, 10)
    ref_scores, ref_idx = reference_topk(q, d, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    # k larger than the corpus returns the whole corpus, ranked
    assert exact_search(q, d[:5], 100)[1].shape == (7, 5)


def test_faiss_and_torch_agree(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    d = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    f_scores, f_idx = exact_search(q, d, 20)
    monkeypatch.setattr(search, "_faiss", lambda: None)
    t_scores, t_idx = exact_search(q, d, 20)
    np.testing.assert_array_equal(f_idx, t_idx)
    np.testing.assert_allclose(f_scores, t_scores, rtol=1e-5, atol=1e-5)


def test_cache_encodes_only_missing_texts(tmp_path):
    model = CountingEmbedder()
    texts = ["alpha", "beta", "gamma", "beta"]  # a duplicate is encoded once
    first = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False)
    assert sorted(model.encoded) == ["alpha", "beta", "gamma"]
    np.testing.assert_array_equal(first, model.encode(texts))
    model.encoded.clear()
    again = encode_corpus(model, texts, cache_dir=tmp_path, show_progress=False)
    assert model.encoded == []
    np.testing.assert_array_equal(again, first)
    # an overlapping corpus (another query set, a grown corpus) encodes only what is new
    more = encode_corpus(model, ["delta", "alpha"], cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["delta"]
    np.testing.assert_array_equal(more[1], first[0])
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


def test_half_written_shard_is_ignored(tmp_path):
    model = CountingEmbedder()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    (store,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (keys,) = store.glob("*.keys.npy")
    keys.unlink()  # as if killed between writing the embeddings and the keys
    model.encoded.clear()
    encode_corpus(model, ["alpha"], cache_dir=tmp_path, show_progress=False)
    assert model.encoded == ["alpha"]
    assert not list(store.glob(".*.tmp"))


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
def test_two_process_sharded_encoding_equals_one_process(tiny_decoder, tmp_path):
    script = Path(__file__).with_name("search_dist_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.npy"
    subprocess.run(
        [sys.executable, str(script), str(tiny_decoder), str(single)], check=True, env=env
    )
    multi = tmp_path / "multi"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    subprocess.run(
        [*torchrun, str(script), str(tiny_decoder), str(multi) + ".npy", str(tmp_path / "cache")],
        check=True,
        env=env,
        timeout=300,
    )
    one = np.load(single)
    for rank in (0, 1):  # every rank returns the full matrix, in the original order
        np.testing.assert_allclose(np.load(f"{multi}.rank{rank}.npy"), one, rtol=1e-5, atol=1e-6)
    # rank 0 wrote the cache: a plain process now reads everything back without encoding
    cached = subprocess.run(
        [sys.executable, str(script), str(tiny_decoder), str(tmp_path / "c.npy"),
         str(tmp_path / "cache")],
        check=True, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert "encoded 0 texts" in cached.stdout
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), one, rtol=1e-5, atol=1e-6)
