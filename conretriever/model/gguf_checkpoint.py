"""A GGUF file turned into a plain float32 checkpoint folder (config, weights, tokenizer), fast.

transformers reads a GGUF of most architectures, Gemma-3 among them, through its legacy path:
gguf-py parses the whole metadata in Python, every vocabulary entry one by one (262,144 for
Gemma-3), once for the config, once more when the tokenizer asks for the config, and again for
the weights; the weights' GGUF-name table is rebuilt once per submodule (313 times for
Gemma-3-270M). On 2 CPU cores that made the first load of the embedded model ~44 s.

For the architectures in ``FAST_ARCHITECTURES`` this module makes the same folder with the same
decisions, taken once:

* **metadata**: transformers' own fast reader (``read_gguf_metadata``: string arrays are skipped,
  not decoded, unless asked for; ~0.1 s);
* **config**: the legacy path's loop over the metadata keys, with transformers' own key table
  and defaults (:func:`legacy_config`). While the folder is built it is registered as the
  architecture's entry of ``GGUF_CONFIG_ARCHS``, the table transformers itself consults for a
  fast config, so the tokenizer's loading takes it too;
* **weights**: each tensor dequantised by gguf-py (the function the legacy path calls), passed
  through the architecture's tensor processor (Gemma stores RMSNorm weights as ``w + 1``) and
  renamed with the legacy path's own map, whose name table is built once;
* **tokenizer**: transformers' GGUF tokenizer conversion, with one function swapped for a
  faster one that returns the same list: Gemma's file lists no merges, so they are derived
  from the 262,144-entry vocabulary (:func:`derive_merges`, ~2x faster than transformers'
  ``generate_merges``, which sorts each token's pairs and then all ~500,000 of them by a
  Python key; the order those sorts give is built directly instead);
* **dequantisation** on two threads (numpy's block arithmetic releases the GIL), each tensor
  still dequantised by gguf-py, so every weight is the same.

Every other architecture takes transformers' whole path (``specs.transformers_checkpoint``).
The tests write a small Gemma-3 GGUF and check that both paths give the same config,
bit-identical weights and the same tokenizer; a slow test does the same for the embedded file.
"""

from __future__ import annotations

import copy
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

# Architectures whose legacy conversion has no special case beyond what legacy_config and the
# tensor processors reproduce, and that the tests compare against transformers' path.
FAST_ARCHITECTURES = ("gemma3",)
# what the legacy path renames the model type to (a GGUF of Gemma-3 holds the text model only)
_MODEL_TYPE = {"gemma3": "gemma3_text"}


def legacy_config(metadata: dict, tensor_names: tuple[str, ...]) -> dict:
    """The config dict transformers' legacy ``load_gguf_checkpoint`` derives from this metadata
    (read by ``read_gguf_metadata``): every ``<prefix>.<key>`` that its table renames, the
    architecture's defaults, tied embeddings when the file has no ``output.weight``, and the
    vocabulary size from the token list when the metadata states none. The legacy parse unwraps
    a one-element array into its element; so does this."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = metadata["general.architecture"]
    config: dict = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {}).items():
        config.setdefault(key, value)
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is None or renamed == -1:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        config[renamed] = value
    config["model_type"] = _MODEL_TYPE.get(config["model_type"], config["model_type"])
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        tokens = metadata["tokenizer.ggml.tokens"]  # a count: the reader skips string arrays
        config["vocab_size"] = tokens if isinstance(tokens, int) else len(tokens)
    return config


@contextmanager
def fast_gguf_config(architecture: str):
    """Within the block, transformers builds this architecture's config from a GGUF with
    :func:`legacy_config` over its fast metadata reader (its ``GGUF_CONFIG_ARCHS`` entry),
    instead of the legacy full parse; the table is restored after."""
    # transformers.integrations.gguf re-exports this very dict: one table to set and restore
    from transformers.integrations.gguf.gguf_config_mapping import GGUF_CONFIG_ARCHS

    saved = GGUF_CONFIG_ARCHS.get(architecture)
    GGUF_CONFIG_ARCHS[architecture] = legacy_config
    try:
        yield
    finally:
        if saved is None:
            GGUF_CONFIG_ARCHS.pop(architecture, None)
        else:
            GGUF_CONFIG_ARCHS[architecture] = saved


@contextmanager
def one_name_table():
    """gguf-py's tensor-name table built once per (architecture, layer count) within the block:
    transformers' weight-name map asks for it once per submodule, and each build walks every
    known tensor name of every architecture."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


# byte widths of GGUF's fixed-size metadata value types (8: string and 9: array vary)
_VALUE_WIDTH = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}


def derive_merges(vocab: dict, vocab_scores: dict | None = None, skip_tokens=None) -> list:
    """The BPE merges a vocabulary implies: the same list, in the same order, as transformers'
    ``generate_merges`` (same arguments; a drop-in replacement), built without its sorts.

    That function collects, for every token in ``vocab_scores`` order (``vocab`` when no
    scores are given), each split ``(left, right)`` whose halves are both in ``vocab``, and
    sorts all of them by ``(score, len(left), len(right))``, descending when scores are given,
    stably. Within one token no two splits tie on that key (``len(left)`` differs), so its own
    per-token sort by ids never shows; between tokens only equal scores tie. Hence: tokens
    grouped by score, the groups in sorted order, a lone token's splits by ``len(left)``, and
    the splits of tokens that share a score sorted together by the two lengths."""
    skip = set(skip_tokens) if skip_tokens is not None else set()
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    by_score: dict = {}
    for token, score in scores.items():
        if token not in skip:
            by_score.setdefault(score, []).append(token)
    merges: list = []
    for score in sorted(by_score, reverse=reverse):
        tokens = by_score[score]
        if len(tokens) == 1:
            merges.extend(_splits(tokens[0], vocab, skip, reverse))
            continue
        tied = [pair for token in tokens for pair in _splits(token, vocab, skip, False)]
        tied.sort(key=lambda pair: (len(pair[0]), len(pair[1])), reverse=reverse)
        merges.extend(tied)
    return merges


def _splits(token: str, vocab: dict, skip: set, longest_left_first: bool) -> list:
    """``(left, right)`` for every cut of ``token`` whose halves are both in ``vocab`` (and
    neither in ``skip``), shortest left half first, or longest with ``longest_left_first``."""
    found = []
    for cut in range(1, len(token)):
        left = token[:cut]
        if left in vocab:
            right = token[cut:]
            if right in vocab and (not skip or (left not in skip and right not in skip)):
                found.append((left, right))
    if longest_left_first:
        found.reverse()
    return found


@contextmanager
def fast_merges():
    """Within the block, transformers' GGUF tokenizer conversion derives merges with
    :func:`derive_merges` (the same list, faster); restored after."""
    try:
        from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    except ImportError:  # a transformers without this module converts as it always does
        yield
        return
    saved = getattr(mapping, "generate_merges", None)
    if saved is None:
        yield
        return
    mapping.generate_merges = derive_merges
    try:
        yield
    finally:
        mapping.generate_merges = saved


def _skip_value(blob: np.ndarray, pos: int, value_type: int) -> int:
    """The offset just past one metadata value of ``value_type`` at ``pos``."""
    if value_type in _VALUE_WIDTH:
        return pos + _VALUE_WIDTH[value_type]
    if value_type == 8:
        (length,) = struct.unpack_from("<Q", blob, pos)
        return pos + 8 + length
    if value_type == 9:
        item_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_type in _VALUE_WIDTH:
            return pos + count * _VALUE_WIDTH[item_type]
        for _ in range(count):
            pos = _skip_value(blob, pos, item_type)
        return pos
    raise ValueError(f"GGUF metadata value of unknown type {value_type} at byte {pos}")


def tensor_arrays(path: Path, alignment: int = 32) -> dict[str, tuple[np.ndarray, int]]:
    """``{gguf name: (raw array, ggml type)}`` in file order, each a view of the file's memory
    map shaped as gguf-py's reader shapes it (what its ``dequantize`` takes): a quantised tensor
    as ``[..., bytes per row]`` of uint8, a float one as its values, dimensions in numpy order
    (GGUF lists the fastest-moving first). The metadata is skipped, not decoded."""
    import gguf

    blob = np.memmap(path, mode="r", dtype=np.uint8).view(np.ndarray)
    if bytes(blob[:4]) != b"GGUF":
        raise ValueError(f"{path} does not start with the GGUF magic bytes")
    _version, n_tensors, n_values = struct.unpack_from("<IQQ", blob, 4)
    pos = 24
    for _ in range(n_values):
        (key_length,) = struct.unpack_from("<Q", blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos + 8 + key_length)
        pos = _skip_value(blob, pos + 12 + key_length, value_type)
    table = []
    for _ in range(n_tensors):
        (name_length,) = struct.unpack_from("<Q", blob, pos)
        name = bytes(blob[pos + 8 : pos + 8 + name_length]).decode("utf-8")
        pos += 8 + name_length
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(qtype), offset))
    data_start = (pos + alignment - 1) // alignment * alignment
    out = {}
    for name, shape, qtype, offset in table:
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block_elements * block_bytes)
        start = data_start + offset
        end = start + int(np.prod(byte_shape))
        if end > len(blob):
            raise ValueError(
                f"tensor {name} ends at byte {end}, past the end of the file ({len(blob)} "
                "bytes): the file is truncated"
            )
        raw = blob[start:end]
        if qtype == gguf.GGMLQuantizationType.F32:
            out[name] = (raw.view(np.float32).reshape(shape), qtype)
        elif qtype == gguf.GGMLQuantizationType.F16:
            out[name] = (raw.view(np.float16).reshape(shape), qtype)
        else:
            out[name] = (raw.reshape(byte_shape), qtype)
    return out


def build_plain_checkpoint(gguf_path: Path, out_dir: Path, header=None) -> None:
    """``out_dir`` gets ``config.json``, ``model.safetensors`` (float32) and the tokenizer files
    of the GGUF model at ``gguf_path``, one of ``FAST_ARCHITECTURES`` (see the module).
    ``header``: the file's ``read_gguf_metadata`` result, when the caller has read it.

    The tokenizer (pure Python and Rust, one core) is converted and saved by a forked child
    while this process dequantises the weights (numpy, both cores): the two stages overlap
    instead of adding up. Where ``fork`` is not available they run one after the other."""
    from transformers.integrations.gguf import read_gguf_metadata

    from conretriever.progress import Progress

    metadata, tensor_names = header or read_gguf_metadata(str(gguf_path))
    architecture = metadata["general.architecture"]
    if architecture not in FAST_ARCHITECTURES:
        raise ValueError(f"no fast path for GGUF architecture {architecture!r}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}; a power of two is required")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = Progress(2, f"convert {gguf_path.name}", unit="stages")
    tokenizer_job = TokenizerJob(gguf_path, architecture, out_dir)
    try:
        model = _plain_model(gguf_path, metadata, tensor_names, alignment)
        bar.update()
        model.save_pretrained(out_dir)
    finally:
        tokenizer_job.wait()  # also when the weights failed: no child outlives the build
    bar.update()
    bar.close()


def save_gguf_tokenizer(gguf_path: Path, architecture: str, out_dir: Path) -> None:
    """transformers' tokenizer conversion of the GGUF (with :func:`derive_merges`), saved into
    ``out_dir``."""
    from transformers import AutoTokenizer

    with fast_gguf_config(architecture), fast_merges():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


class TokenizerJob:
    """:func:`save_gguf_tokenizer` in a forked child (or at once, without ``fork``); ``wait``
    joins it and raises its error here, as a ValueError of one line."""

    def __init__(self, gguf_path: Path, architecture: str, out_dir: Path):
        import multiprocessing

        self.process = None
        if "fork" not in multiprocessing.get_all_start_methods():
            save_gguf_tokenizer(gguf_path, architecture, out_dir)
            return
        context = multiprocessing.get_context("fork")
        self.receive, send = context.Pipe(duplex=False)
        self.process = context.Process(target=_tokenizer_child,
                                       args=(send, gguf_path, architecture, out_dir),
                                       daemon=True)  # fmt: skip
        self.process.start()
        send.close()

    def wait(self) -> None:
        if self.process is None:
            return
        error = self.receive.recv() if self.receive.poll(None) else None
        self.process.join()
        self.receive.close()
        if error is None and self.process.exitcode != 0:
            error = f"the tokenizer conversion died (exit code {self.process.exitcode})"
        if error is not None:
            raise ValueError(error)


def _tokenizer_child(send, gguf_path: Path, architecture: str, out_dir: Path) -> None:
    try:
        save_gguf_tokenizer(gguf_path, architecture, out_dir)
        send.send(None)
    except BaseException as exc:  # reported by the parent: a child has no one to tell
        send.send(f"converting the tokenizer of {gguf_path.name}: {type(exc).__name__}: {exc}")
    finally:
        send.close()


def _plain_model(gguf_path: Path, metadata: dict, tensor_names, alignment: int):
    """The float32 transformers model of the GGUF's weights (dequantised, renamed, tied)."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    architecture = metadata["general.architecture"]
    config_dict = legacy_config(metadata, tensor_names)
    config = AutoConfig.for_model(**copy.deepcopy(config_dict))
    config.dtype = torch.float32
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    with one_name_table():
        names = get_gguf_hf_weights_map(model, processor)
    state = {}
    arrays = tensor_arrays(gguf_path, alignment)
    # numpy releases the GIL in the block arithmetic: two threads share this stage's work
    with ThreadPoolExecutor(max_workers=2) as pool:
        dequantised = pool.map(lambda item: gguf.quants.dequantize(*item), arrays.values())
        for name, weights in zip(arrays, dequantised, strict=True):
            result = processor.process(weights=weights, name=name, tensor_key_mapping=names,
                                       parsed_parameters={"config": config_dict})  # fmt: skip
            if result.name in names:
                state[names[result.name]] = torch.from_numpy(np.copy(result.weights)).float()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # lm_head shares the embedding matrix (absent from the file)
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        what = "weights not found in the file" if missing else "tensors the model has no place for"
        raise ValueError(f"{len(missing or unexpected)} {what} ({shown})")
    return model
