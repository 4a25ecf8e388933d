"""The on-disk embedding store: corpus vectors kept between runs, verified, never trusted blindly.

A store is a folder for one ``(model fingerprint, document length, dtype)``. It holds shards,
each written by one process in one go:

* ``<id>.emb.npy``: ``[n, dim]`` vectors, float32 or float16 (half the disk and memory);
* ``<id>.keys.npy``: ``[n, 16]`` uint8, the first 16 bytes of each text's sha256;
* ``<id>.json``: rows, dim, dtype and the sha256 of both files, written LAST: a shard without
  it is incomplete (a killed run) and ignored. Files are written under temporary names and
  renamed, so a shard is whole or absent.

Reading is on demand (:class:`ShardArray`: a block of rows is read when searched, into memory
the process owns; no copy of a shard is made),
and checksums are verified: a shard's keys when the store is opened, its vectors the first
time a process uses them (:meth:`EmbeddingStore.verify`). A corrupt or truncated shard is
skipped with a warning naming it, and its texts are encoded again. Lookups
need no Python object per document: the keys of all shards are one sorted uint64 array (the
first 8 key bytes) searched with ``np.searchsorted``, each hit then checked against all 16
bytes. Shards do not depend on how many processes wrote them, so a later run with another world
size reads them all.

Writing never fails a run: before a write the free space is checked, and a write that fails
(disk full, read-only folder) logs one warning and turns the store off for the rest of the run,
which then finishes without caching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("conretriever.store")

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
_HASH_CHUNK = 1 << 24  # 16 MiB per read while checksumming


def text_keys(texts: list[str]) -> np.ndarray:
    """[n, 16] uint8: the first 16 bytes of each text's sha256 (its key in the store)."""
    out = np.empty((len(texts), 16), dtype=np.uint8)
    for i, text in enumerate(texts):
        out[i] = np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest()[:16], np.uint8)
    return out


def _prefix(keys: np.ndarray) -> np.ndarray:
    """The first 8 key bytes as one sortable uint64 per key."""
    return np.ascontiguousarray(keys[:, :8]).view(">u8").reshape(-1).astype(np.uint64)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardArray:
    """The ``[rows, dim]`` array of one ``.npy`` file, read on demand with ``os.pread``.

    Rows are read into fresh buffers, not mapped: a process's resident memory is what it asked
    for (one block of rows), whatever the file's size, and no page of a 100 GB corpus stays
    attributed to it. Indexing takes a slice or a sorted integer array (runs of consecutive rows
    are read in one call)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # fmt: skip
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path.name}: expected a C-ordered 2-D array, got {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        if self.path.stat().st_size < self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path.name}: truncated ({self.path.stat().st_size} bytes)")

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, fd: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):  # straight into the array: no intermediate copy
            got = os.preadv(fd, [view[done:]], self.offset + start * self.row_bytes + done)
            if got == 0:
                raise OSError(f"{self.path}: short read (rows {start}:{stop})")
            done += got
        return out

    def __getitem__(self, key) -> np.ndarray:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if isinstance(key, slice):
                start, stop, step = key.indices(self.shape[0])
                if step != 1:
                    raise IndexError("only contiguous slices")
                return self._read(fd, start, stop)
            rows = np.asarray(key, np.int64)
            if len(rows) == 0:
                return np.zeros((0, self.shape[1]), self.dtype)
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            parts = [self._read(fd, int(r[0]), int(r[-1]) + 1)
                     for r in np.split(rows, breaks)]  # fmt: skip
            return np.concatenate(parts)
        finally:
            os.close(fd)


@dataclass
class Shard:
    name: str
    rows: int
    dim: int
    vectors: ShardArray  # [rows, dim], read on demand
    keys: np.ndarray  # [rows, 16] uint8
    emb_sha256: str
    verified: bool = False  # vectors checksummed in this process
    bad: bool = False


class EmbeddingStore:
    """A folder of verified shards; see the module docstring."""

    def __init__(self, folder: Path, dtype: str = "float32"):
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
        self.folder = Path(folder)
        self.dtype = dtype
        self.writable = True
        self.shards: list[Shard] = []
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._load()

    # ----- reading --------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for meta_path in sorted(self.folder.glob("*.json")):
            shard = self._open(meta_path)
            if shard is not None:
                self.shards.append(shard)

    def _open(self, meta_path: Path) -> Shard | None:
        name = meta_path.name[: -len(".json")]
        emb_path = self.folder / f"{name}.emb.npy"
        keys_path = self.folder / f"{name}.keys.npy"
        try:
            meta = json.loads(meta_path.read_text())
            if _sha256(keys_path) != meta["keys_sha256"]:
                raise ValueError(f"{keys_path.name}: checksum mismatch (corrupt bytes)")
            vectors = ShardArray(emb_path)
            keys = np.load(keys_path)
            if vectors.shape != (meta["rows"], meta["dim"]) or keys.shape != (meta["rows"], 16):
                raise ValueError(f"shapes {vectors.shape} / {keys.shape} do not match {meta}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._skip(self.folder / name, err)
            return None
        return Shard(name, int(meta["rows"]), int(meta["dim"]), vectors, keys, meta["emb_sha256"])

    def _skip(self, where: Path, why) -> None:
        log.warning("embedding cache: skipping shard %s (%s); its texts will be encoded again",
                    where, why)  # fmt: skip

    def verify(self, numbers) -> set[int]:
        """Checksum the vectors of the given shards (once per process each); the corrupt ones
        are dropped from the store, with a warning, and returned."""
        bad = set()
        for i in sorted(set(int(n) for n in numbers)):
            shard = self.shards[i]
            if shard.verified or shard.bad:
                bad |= {i} if shard.bad else set()
                continue
            path = self.folder / f"{shard.name}.emb.npy"
            try:
                ok = _sha256(path) == shard.emb_sha256
            except OSError:
                ok = False
            shard.verified, shard.bad = ok, not ok
            if not ok:
                self._skip(path, "checksum mismatch (corrupt bytes)")
                bad.add(i)
        if bad:
            self._index = None  # rebuilt without the bad shards
        return bad

    def _lookup_index(self):
        """(sorted uint64 prefixes, shard number, row) over every shard, built once."""
        if self._index is None:
            usable = [(i, s) for i, s in enumerate(self.shards) if not s.bad]
            if not usable:
                empty = np.zeros(0, np.uint64)
                self._index = (empty, np.zeros(0, np.int32), np.zeros(0, np.int64))
            else:
                prefixes = np.concatenate([_prefix(s.keys) for _, s in usable])
                shard_of = np.concatenate([np.full(s.rows, i, np.int32) for i, s in usable])
                row_of = np.concatenate([np.arange(s.rows, dtype=np.int64) for _, s in usable])
                order = np.argsort(prefixes, kind="stable")
                self._index = (prefixes[order], shard_of[order], row_of[order])
        return self._index

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For [n, 16] keys: (found [n] bool, shard [n] int32, row [n] int64)."""
        prefixes, shard_of, row_of = self._lookup_index()
        found = np.zeros(len(keys), bool)
        shard = np.full(len(keys), -1, np.int32)
        row = np.full(len(keys), -1, np.int64)
        if len(prefixes) == 0 or len(keys) == 0:
            return found, shard, row
        wanted = _prefix(keys)
        pos = np.minimum(np.searchsorted(prefixes, wanted), len(prefixes) - 1)
        hit = prefixes[pos] == wanted
        for i in np.flatnonzero(hit):  # confirm all 16 bytes (8-byte prefixes can collide)
            s, r = shard_of[pos[i]], row_of[pos[i]]
            if np.array_equal(self.shards[s].keys[r], keys[i]):
                found[i], shard[i], row[i] = True, s, r
        return found, shard, row

    # ----- writing --------------------------------------------------------------------------
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> int | None:
        """Write one shard; returns its number, or None when the store cannot take it (then it
        is off for the rest of the run, with one warning)."""
        if not self.writable or len(keys) == 0:
            return None
        data = np.ascontiguousarray(vectors, dtype=STORE_DTYPES[self.dtype])
        name = uuid.uuid4().hex
        files = {".emb.npy": data, ".keys.npy": np.ascontiguousarray(keys, dtype=np.uint8)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            need = data.nbytes + keys.nbytes + (64 << 20)
            free = shutil.disk_usage(self.folder).free
            if free < need:
                raise OSError(f"{free / 2**30:.1f} GiB free, the shard needs {need / 2**30:.1f}")
            meta = {"rows": len(keys), "dim": int(data.shape[1]), "dtype": self.dtype}
            for suffix, array in files.items():
                tmp = self.folder / f".{name}{suffix}.tmp"
                with open(tmp, "wb") as handle:
                    np.save(handle, array)
                meta[("emb" if suffix == ".emb.npy" else "keys") + "_sha256"] = _sha256(tmp)
                os.replace(tmp, self.folder / f"{name}{suffix}")
            tmp = self.folder / f".{name}.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.folder / f"{name}.json")  # the shard exists from here on
        except OSError as err:
            self.writable = False
            for suffix in (*files, ".json"):
                (self.folder / f".{name}{suffix}.tmp").unlink(missing_ok=True)
            log.warning("embedding cache %s: cannot write (%s); this run goes on without "
                        "caching", self.folder, err)  # fmt: skip
            return None
        vectors = ShardArray(self.folder / f"{name}.emb.npy")
        shard = Shard(name, len(keys), int(data.shape[1]), vectors, files[".keys.npy"],
                      meta["emb_sha256"], verified=True)  # fmt: skip
        self.shards.append(shard)
        self._index = None
        return len(self.shards) - 1
