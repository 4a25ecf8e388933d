"""Corpus encoding: each rank encodes its own contiguous slice, straight into the on-disk store.

Evaluation and mining start by encoding a corpus as passages (:func:`encode_corpus`), the
expensive part. Under ``torchrun`` (any number of nodes) rank ``r`` of ``W`` takes the
contiguous slice ``[r * N // W, (r + 1) * N // W)`` of the ``N`` documents: it looks its texts
up in the store (``retrieval.store``, keyed by model fingerprint, length limit and dtype), encodes
only the missing ones, writes them as its own shard and returns a :class:`CorpusVectors` for the
slice. No rank ever holds the whole corpus, nor even its own slice in memory when a store is
used: vectors stay in their shards on disk and are read one block at a time by the search
(``retrieval.search``), which gathers only each query's top-k across ranks.

An FSDP-sharded model all-gathers its weights in every forward, so every rank must run as many
forwards as the others: ranks with fewer texts to encode pad with repeats of one of theirs
(counts agreed with one ``all_reduce``).

:func:`model_fingerprint` names the weights: it must change when training changes them, else the
cache would serve stale vectors. It hashes every tensor's name, shape, dtype, float64 sum and a
strided sample of values (small tensors such as LoRA factors in full), plus the pooling/prompt
settings, the tokenizer and the device type (bf16 on GPU gives other vectors than fp32 on CPU).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from conretriever import runtime
from conretriever.retrieval.store import EmbeddingStore, text_keys

# Tensors up to this many values are hashed in full (LoRA factors, norms, biases); larger ones by
# sum + a strided sample, so fingerprinting a 7B model costs a few seconds, not a full read.
_FULL_HASH_NUMEL = 1 << 16
_SAMPLE_VALUES = 1024
_STORE_FORMAT = "v2"  # part of the store folder's name: older caches are simply not read


def model_fingerprint(embedder) -> str:
    """A 16-hex-digit name for what decides the vectors: weights, settings, tokenizer, device.

    Under FSDP, sharded (DTensor) weights are gathered, so every rank must call this."""
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
        # the store keeps full vectors: truncation is applied when they are read
        values = {k: v for k, v in asdict(settings).items() if k != "truncate_dim"}
        for newer in ("bidirectional", "query_prompt", "document_prompt"):
            if not values.get(newer):  # fingerprints from before the setting existed
                values.pop(newer, None)
        digest.update(json.dumps(values, sort_keys=True).encode())
    tokenizer = getattr(embedder, "tokenizer", None)
    if tokenizer is not None:
        probe = tokenizer("Fingerprint probe: Hello, world! 123").input_ids
        digest.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{probe}".encode())
    device = getattr(embedder, "device", None)
    digest.update(str(getattr(device, "type", device)).encode())
    return digest.hexdigest()[:16]


class CorpusVectors:
    """The vectors of corpus rows ``[start, stop)`` (a rank's slice, or all), in corpus order.

    Each row lives in a store shard (read on demand) or in an in-memory array; :meth:`block`
    and :meth:`rows` read what is asked for, as float32. ``dim`` is the vector width."""

    def __init__(self, start: int, stop: int, dim: int, sources: list, source: np.ndarray,
                 row: np.ndarray, total: int | None = None, keep: int = 0,
                 normalize: bool = True):  # fmt: skip
        self.start, self.stop = start, stop
        self.full_dim = dim
        self.keep, self.normalize = keep if keep and keep < dim else 0, normalize
        self.dim = self.keep or dim  # what block() and rows() return
        self.total = stop if total is None else total  # documents in the whole corpus
        self.sources = sources  # [n_i, dim]: store shards (read on demand) or arrays
        self.source, self.row = source, row  # per local row: which array, which row of it

    @classmethod
    def from_array(cls, vectors: np.ndarray, start: int = 0) -> CorpusVectors:
        n = len(vectors)
        dim = vectors.shape[1] if vectors.ndim == 2 else 0
        return cls(start, start + n, dim, [vectors], np.zeros(n, np.int32), np.arange(n))

    def __len__(self) -> int:
        return self.stop - self.start

    def _gather(self, local: np.ndarray) -> np.ndarray:
        src, rows = self.source[local], self.row[local]
        if len(local) and (src == src[0]).all() and (np.diff(rows) == 1).all():
            # the usual block: consecutive rows of one shard, read once, no second copy
            block = self.sources[src[0]][rows[0] : rows[-1] + 1]
            return np.asarray(block, dtype=np.float32)
        out = np.empty((len(local), self.full_dim), np.float32)
        for s in np.unique(src):
            mask = src == s
            picked = rows[mask]
            array = self.sources[s]
            if len(picked) and picked[-1] - picked[0] + 1 == len(picked):  # contiguous: slice
                out[mask] = array[picked[0] : picked[-1] + 1]
            else:
                out[mask] = array[np.sort(picked)][np.argsort(np.argsort(picked))]
        return out

    def block(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` (global indices, inside this slice) as a float32 array."""
        return self._cut(self._gather(np.arange(lo - self.start, hi - self.start)))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (global indices, inside this slice) as a float32 array."""
        return self._cut(self._gather(np.asarray(ids, np.int64) - self.start))

    def _cut(self, vectors: np.ndarray) -> np.ndarray:
        from conretriever.model.embedder import truncate_vectors

        return truncate_vectors(vectors, self.keep, self.normalize) if self.keep else vectors

    def to_array(self) -> np.ndarray:
        return self.block(self.start, self.stop)


def rank_slice(n: int) -> tuple[int, int]:
    """This rank's contiguous slice of ``n`` items: ``[r * n // W, (r + 1) * n // W)``."""
    r, w = runtime.rank(), runtime.world_size()
    return n * r // w, n * (r + 1) // w


def _equal_forwards(texts: list[str], fallback: str) -> list[str]:
    """Pad this rank's texts with repeats so every rank encodes as many (FSDP: see module)."""
    if not runtime.is_distributed():
        return texts
    (count,) = runtime.most_over_ranks(len(texts))
    filler = texts[-1] if texts else fallback
    return texts + [filler] * (count - len(texts))


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
    """``embedder.encode`` split over ``torchrun`` ranks: each rank encodes its slice and every
    rank gets the full [n, dim] matrix (for queries: small next to a corpus). Without an
    initialised process group it is a plain ``encode`` call (no cache)."""
    if not texts:
        return np.zeros((0, getattr(embedder, "dim", 0)), np.float32)
    lo, hi = rank_slice(len(texts))
    mine = list(texts[lo:hi])
    padded = _equal_forwards(mine, texts[0])
    emb = embedder.encode(
        padded,
        role=role,
        instruction=instruction,
        batch_size=batch_size,
        max_length=max_length,
        show_progress=show_progress and runtime.is_main(),
    ).astype(np.float32, copy=False)[: len(mine)]
    if not runtime.is_distributed():
        return emb
    pieces: list[np.ndarray | None] = [None] * runtime.world_size()
    torch.distributed.all_gather_object(pieces, emb)
    return np.concatenate(pieces, axis=0)


def open_store(embedder, cache_dir, max_length, dtype: str = "float32") -> EmbeddingStore:
    tag = "f16" if dtype == "float16" else "f32"
    folder = Path(cache_dir) / f"{model_fingerprint(embedder)}-L{max_length}-{tag}-{_STORE_FORMAT}"
    return EmbeddingStore(folder, dtype)


def chunk_rows(dim: int, memory_gb: float) -> int:
    """Texts encoded (then written to the store) at a time: their vectors, and the encoder's
    copy of them, fit ``memory_gb``."""
    return max(1024, int(memory_gb * 2**30 // max(1, dim * 4 * 2)))


def encode_corpus(
    embedder,
    texts: list[str],
    *,
    batch_size: int = 256,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    store_dtype: str = "float32",
    show_progress: bool = True,
    memory_gb: float = 2.0,
    role: str = "passage",
    instruction: str | None = None,
) -> CorpusVectors:
    """This rank's slice of ``texts`` encoded as passages (see the module docstring), or as
    queries with ``role="query"`` and their ``instruction`` (a teacher's vectors of training
    queries): a query's store key is that of its role, instruction and text together, so the
    same words under two instructions are two entries, and never a passage's.

    With ``cache_dir`` vectors are read from / added to the store for this model; only texts it
    lacks are encoded (each distinct text once), in chunks sized by ``memory_gb``, each chunk
    written as a shard before the next is encoded, so the slice never sits in memory.
    ``max_length`` None means the embedder's ``doc_max_length`` (``query_max_length`` for
    queries); ``store_dtype`` float16 halves the store's disk and memory. Without ``cache_dir``
    the slice's vectors are kept in memory."""
    texts = list(texts)
    if max_length is None:
        length = "query_max_length" if role == "query" else "doc_max_length"
        max_length = getattr(getattr(embedder, "settings", None), length, None)
    lo, hi = rank_slice(len(texts))
    keys = text_keys(texts[lo:hi] if role == "passage" else
                     [f"{role}\0{instruction or ''}\0{t}" for t in texts[lo:hi]])  # fmt: skip
    store = open_store(embedder, cache_dir, max_length, store_dtype) if cache_dir else None
    n = hi - lo
    found, shard, row = store.lookup(keys) if store else (np.zeros(n, bool), None, None)
    if store is not None and found.any():
        bad = store.verify(np.unique(shard[found]))
        if bad:
            found &= ~np.isin(shard, list(bad))
    sources: list = []
    source = np.zeros(n, np.int32)
    rows = np.zeros(n, np.int64)
    if store is not None:
        used = np.unique(shard[found])
        position = {int(s): i for i, s in enumerate(used)}
        sources += [store.shards[int(s)].vectors for s in used]
        source[found] = [position[int(s)] for s in shard[found]]
        rows[found] = row[found]
    # each distinct missing text once, without a Python object per document
    missing = np.flatnonzero(~found)
    unique_keys, first, inverse = np.unique(
        np.ascontiguousarray(keys[missing]).view("V16").ravel(), return_index=True,
        return_inverse=True,
    )  # fmt: skip
    order = np.argsort(first)  # encode in corpus order
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    to_encode = missing[first[order]]
    where = rank_of[inverse]  # position of each missing row's text in to_encode
    chunk = chunk_rows(getattr(embedder, "dim", 1024) or 1024, memory_gb)
    chunks = _encode_chunks(embedder, store, texts, lo, to_encode, keys, chunk, batch_size,
                            max_length, show_progress, role, instruction)  # fmt: skip
    for begin, array in chunks:
        sources.append(array)
        members = (where >= begin) & (where < begin + len(array))
        source[missing[members]] = len(sources) - 1
        rows[missing[members]] = where[members] - begin
    dim = getattr(embedder, "dim", None) or (sources[0].shape[1] if sources else 0)
    settings = getattr(embedder, "settings", None)
    return CorpusVectors(lo, hi, int(dim), sources, source, rows, total=len(texts),
                         keep=getattr(settings, "truncate_dim", 0) or 0,
                         normalize=getattr(settings, "normalize", True))  # fmt: skip


def _encode_chunks(embedder, store, texts, lo, to_encode, keys, chunk, batch_size, max_length,
                   show_progress, role="passage",
                   instruction=None) -> list[tuple[int, np.ndarray]]:  # fmt: skip
    """Encode ``texts[lo + to_encode]`` in chunks; each chunk goes to the store when there is
    one (its on-disk shard is returned), else stays in memory. Every rank runs as many
    chunks of as many texts as the others (FSDP: see the module docstring)."""
    count = len(to_encode)
    (total,) = runtime.most_over_ranks(count)
    filler = texts[lo + int(to_encode[-1])] if count else (texts[lo] if lo < len(texts) else "")
    out = []
    for begin in range(0, total, chunk):
        ids = to_encode[begin : begin + chunk]
        batch = [texts[lo + int(i)] for i in ids]
        batch += [filler] * (min(chunk, total - begin) - len(batch))  # equal forwards
        full = {"truncate": False} if getattr(getattr(embedder, "settings", None),
                                              "truncate_dim", 0) else {}  # fmt: skip
        if role != "passage":
            full["instruction"] = instruction
        emb = np.asarray(
            embedder.encode(batch, role=role, batch_size=batch_size, max_length=max_length,
                            show_progress=show_progress and runtime.is_main(), **full),
            dtype=np.float32,
        )[: len(ids)]  # fmt: skip
        if not len(ids):
            continue
        written = store.add(keys[ids], emb) if store is not None else None
        out.append((begin, store.shards[written].vectors if written is not None else emb))
    return out
