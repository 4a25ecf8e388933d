"""Search: encode a corpus once (cached, sharded over ranks) and find exact nearest neighbours.

Dense retrieval evaluation and hard-negative mining both come down to two steps:

1. **Encode the corpus** as passages (:func:`encode_corpus`). This is the expensive part (every
   document through the model), so vectors are cached on disk per document, keyed by
   ``(model fingerprint, document-length limit, sha256 of the text)``. Evaluating again, a second
   query set against the same corpus, or a corpus that overlaps one seen before encodes only
   the texts the cache does not hold. The store for one key prefix is a folder of shards
   ``<id>.emb.npy`` ([n, dim] float32) + ``<id>.keys.npy`` ([n, 16] uint8 sha256 prefixes);
   a shard is written to a temporary name and renamed (keys last), so a killed run leaves
   either a whole shard or nothing a later run would trust.
2. **Search exactly** (:func:`exact_search`): vectors are unit length, so the inner product is
   the cosine similarity. Backend: faiss ``IndexFlatIP`` on GPU when faiss sees GPUs; else a
   chunked matmul + top-k in torch on the GPU when torch has one (faster than faiss-cpu); else
   faiss-cpu when importable; else torch on the CPU.

:func:`model_fingerprint` names the weights: it must change when training changes them, else the
cache would serve stale vectors. It hashes every tensor's name, shape, dtype, float64 sum and a
strided sample of values (small tensors such as LoRA factors in full), plus the pooling/prompt
settings, the tokenizer and the device type (bf16 autocast on GPU gives other vectors than fp32
on CPU).

Under ``torchrun`` (``torch.distributed`` initialised) each rank encodes one contiguous shard of
the missing texts and the pieces are gathered in the original order on every rank, so every rank
returns the same matrix; only rank 0 writes the cache. faiss is imported lazily: the training path
never needs it.

API (stable; ``conretriever.data.mining`` builds on it)::

    model_fingerprint(embedder) -> str
    encode_corpus(embedder, texts, *, batch_size=256, max_length=None, cache_dir=None,
                  show_progress=True) -> np.ndarray          # [len(texts), dim] float32
    exact_search(query_emb, doc_emb, top_k) -> (scores, indices)   # each [n_queries, k]
    encode_sharded(embedder, texts, *, role, instruction=None, batch_size=256, max_length=None,
                   show_progress=True) -> np.ndarray       # uncached encode, split over ranks
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

# Tensors up to this many values are hashed in full (LoRA factors, norms, biases); larger ones by
# sum + a strided sample, so fingerprinting a 7B model costs a few seconds, not a full read.
_FULL_HASH_NUMEL = 1 << 16
_SAMPLE_VALUES = 1024
# Query rows per matmul chunk in the torch search path: the [rows, n_docs] score block stays
# near 2**26 floats (256 MiB) whatever the corpus size.
_SCORE_BLOCK = 1 << 26


# ----- identity ---------------------------------------------------------------------------------
def model_fingerprint(embedder) -> str:
    """A 16-hex-digit name for what decides the vectors: weights, settings, tokenizer, device.

    ``embedder`` is an :class:`~conretriever.model.embedder.Embedder` or any ``nn.Module`` with an
    ``encode`` method. Under FSDP, sharded (DTensor) weights are gathered, so every rank must call
    this (``encode_corpus`` does).
    """
    digest = hashlib.sha256(type(embedder).__qualname__.encode())
    state = embedder.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if hasattr(tensor, "full_tensor"):  # DTensor shard (FSDP2): hash the whole tensor
            tensor = tensor.full_tensor()
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if flat.numel() <= _FULL_HASH_NUMEL:
            digest.update(flat.float().cpu().numpy().tobytes())
        else:
            step = flat.numel() // _SAMPLE_VALUES
            digest.update(flat[::step].float().cpu().numpy().tobytes())
            digest.update(repr(float(flat.double().sum())).encode())
    settings = getattr(embedder, "settings", None)
    if is_dataclass(settings):
        digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is not None:
        probe = tokenizer("Fingerprint probe: Hello, world! 123").input_ids
        digest.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{probe}".encode())
    device = getattr(embedder, "device", None)
    digest.update(str(getattr(device, "type", device)).encode())
    return digest.hexdigest()[:16]


def text_key(text: str) -> bytes:
    """16-byte sha256 digest of a text: its key in the embedding cache."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


# ----- on-disk store ----------------------------------------------------------------------------
class _ShardStore:
    """A folder of (keys, embeddings) shards; reads are memory-mapped, writes atomic."""

    def __init__(self, folder: Path):
        self.folder = folder

    def lookup(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        wanted = set(keys)
        found: dict[bytes, np.ndarray] = {}
        if not self.folder.is_dir():
            return found
        for keys_file in sorted(self.folder.glob("*.keys.npy")):
            emb_file = keys_file.with_name(keys_file.name.replace(".keys.npy", ".emb.npy"))
            # [n, 16] uint8, not a bytes dtype: numpy's "S16" strips trailing zero bytes.
            shard_keys = [row.tobytes() for row in np.load(keys_file)]
            rows = [i for i, k in enumerate(shard_keys) if k in wanted and k not in found]
            if not rows:
                continue
            emb = np.load(emb_file, mmap_mode="r")
            for i in rows:
                found[shard_keys[i]] = np.asarray(emb[i], dtype=np.float32)
        return found

    def add(self, keys: list[bytes], emb: np.ndarray) -> None:
        if not keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        # embeddings first, keys last: a shard is visible only once its keys file exists.
        key_matrix = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 16)
        for suffix, array in ((".emb.npy", emb.astype(np.float32)), (".keys.npy", key_matrix)):
            tmp = self.folder / f".{name}{suffix}.tmp"
            with open(tmp, "wb") as handle:
                np.save(handle, array)
            os.replace(tmp, self.folder / f"{name}{suffix}")


# ----- encoding ---------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def encode_sharded(
    embedder,
    texts: list[str],
    *,
    role: str = "passage",
    instruction: str | None = None,
    batch_size: int = 256,
    max_length: int | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """``embedder.encode`` split over ``torchrun`` ranks: each rank encodes a contiguous slice
    and the slices are gathered in rank order, so every rank returns the full [n, dim] matrix.
    Without an initialised process group it is a plain ``encode`` call (no cache)."""
    rank, world = _dist_info()
    if not texts:
        return np.zeros((0, getattr(embedder, "dim", 0)), np.float32)
    bounds = [len(texts) * r // world for r in range(world + 1)]
    mine = list(texts[bounds[rank] : bounds[rank + 1]])
    # Every rank encodes the same number of texts (shards differ by at most one; pad by repeating
    # a text), so every rank runs the same number of forward passes: an FSDP-sharded model
    # all-gathers its weights in each forward and would hang if one rank stopped early.
    per_rank = -(-len(texts) // world)
    padded = mine + [mine[-1] if mine else texts[0]] * (per_rank - len(mine))
    emb = embedder.encode(
        padded,
        role=role,
        instruction=instruction,
        batch_size=batch_size,
        max_length=max_length,
        show_progress=show_progress and rank == 0,
    ).astype(np.float32, copy=False)[: len(mine)]
    if world == 1:
        return emb
    pieces: list[np.ndarray | None] = [None] * world
    torch.distributed.all_gather_object(pieces, emb)
    return np.concatenate(pieces, axis=0)


def encode_corpus(
    embedder,
    texts: list[str],
    *,
    batch_size: int = 256,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Encode ``texts`` as passages -> float32 [len(texts), dim], in input order.

    With ``cache_dir``, vectors are read from / added to the store
    ``cache_dir/<model_fingerprint>-L<max_length>/``; only texts it lacks are encoded (each
    distinct text once). ``max_length`` None means the embedder's ``doc_max_length``.
    """
    texts = list(texts)
    if max_length is None:
        settings = getattr(embedder, "settings", None)
        max_length = getattr(settings, "doc_max_length", None)
    keys = [text_key(t) for t in texts]
    store = None
    cached: dict[bytes, np.ndarray] = {}
    if cache_dir is not None:
        store = _ShardStore(Path(cache_dir) / f"{model_fingerprint(embedder)}-L{max_length}")
        cached = store.lookup(keys)
    missing_keys: list[bytes] = []
    missing_texts: list[str] = []
    seen = set(cached)
    for key, text in zip(keys, texts, strict=True):
        if key not in seen:
            seen.add(key)
            missing_keys.append(key)
            missing_texts.append(text)
    fresh: dict[bytes, np.ndarray] = {}
    if missing_texts:
        emb = encode_sharded(
            embedder,
            missing_texts,
            role="passage",
            batch_size=batch_size,
            max_length=max_length,
            show_progress=show_progress,
        )
        fresh = dict(zip(missing_keys, emb, strict=True))
        if store is not None and _dist_info()[0] == 0:
            store.add(missing_keys, emb)
    if not texts:
        return np.zeros((0, getattr(embedder, "dim", 0)), np.float32)
    lookup = {**cached, **fresh}
    return np.stack([lookup[k] for k in keys]).astype(np.float32, copy=False)


# ----- exact search -----------------------------------------------------------------------------
def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def exact_search(query_emb, doc_emb, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``top_k`` documents per query by inner product -> (scores, indices), each float32 /
    int64 [n_queries, min(top_k, n_docs)], best first.

    Ties are ordered by document index. With the torch backend this holds at the cut-off too
    (of several documents tied with the k-th score, the lowest indices get in); faiss decides
    the cut-off among exact ties itself (repeatably).
    """
    q = np.ascontiguousarray(np.asarray(query_emb, dtype=np.float32))
    d = np.ascontiguousarray(np.asarray(doc_emb, dtype=np.float32))
    if q.ndim != 2 or d.ndim != 2 or (len(d) and q.shape[1] != d.shape[1]):
        raise ValueError(f"need [nq, dim] and [nd, dim] matrices, got {q.shape} and {d.shape}")
    k = min(int(top_k), len(d))
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    faiss = _faiss()
    use_gpu_faiss = faiss is not None and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if faiss is not None and (use_gpu_faiss or not torch.cuda.is_available()):
        index = faiss.IndexFlatIP(d.shape[1])
        if use_gpu_faiss:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(d)
        scores, indices = index.search(q, k)
        return _order_ties(scores.astype(np.float32), indices.astype(np.int64))
    return _torch_search(q, d, k)


def _order_ties(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    order = np.lexsort((indices, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)


def _torch_search(q: np.ndarray, d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    docs = torch.from_numpy(d).to(device)
    rows = max(1, _SCORE_BLOCK // len(d))
    out_scores, out_indices = [], []
    for start in range(0, len(q), rows):
        scores = torch.from_numpy(q[start : start + rows]).to(device) @ docs.T
        kth = scores.topk(k, dim=1).values[:, -1:]
        # Exact tie rule: everything above the k-th score, then the lowest-index ties with it.
        above = scores > kth
        ties = scores == kth
        need = k - above.sum(1, keepdim=True)
        take = above | (ties & (ties.cumsum(1) <= need))
        idx = take.nonzero()[:, 1].view(-1, k)  # row-major: index order inside each row
        val = scores.gather(1, idx)
        val, pos = val.sort(dim=1, descending=True, stable=True)  # stable: ties by index
        out_scores.append(val.cpu().numpy())
        out_indices.append(idx.gather(1, pos).cpu().numpy())
    return np.concatenate(out_scores).astype(np.float32), np.concatenate(out_indices)
