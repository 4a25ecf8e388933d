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
* **tokenizer**: transformers' GGUF tokenizer conversion, unchanged.

Every other architecture takes transformers' whole path (``specs.transformers_checkpoint``).
The tests write a small Gemma-3 GGUF and check that both paths give the same config,
bit-identical weights and the same tokenizer; a slow test does the same for the embedded file.
"""

from __future__ import annotations

import copy
import struct
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
    ``header``: the file's ``read_gguf_metadata`` result, when the caller has read it."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import read_gguf_metadata
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from conretriever.progress import Progress

    metadata, tensor_names = header or read_gguf_metadata(str(gguf_path))
    architecture = metadata["general.architecture"]
    if architecture not in FAST_ARCHITECTURES:
        raise ValueError(f"no fast path for GGUF architecture {architecture!r}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment is {alignment!r}; a power of two is required")
    bar = Progress(3, f"convert {gguf_path.name}", unit="stages")
    with fast_gguf_config(architecture):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    bar.update()

    config_dict = legacy_config(metadata, tensor_names)
    config = AutoConfig.for_model(**copy.deepcopy(config_dict))
    config.dtype = torch.float32
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config_dict)
    with one_name_table():
        names = get_gguf_hf_weights_map(model, processor)
    state = {}
    for name, (raw, qtype) in tensor_arrays(gguf_path, alignment).items():
        result = processor.process(
            weights=gguf.quants.dequantize(raw, qtype),
            name=name,
            tensor_key_mapping=names,
            parsed_parameters={"config": config_dict},
        )
        if result.name in names:
            state[names[result.name]] = torch.from_numpy(np.copy(result.weights)).float()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # lm_head shares the embedding matrix (absent from the file)
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        what = "weights not found in the file" if missing else "tensors the model has no place for"
        raise ValueError(f"{len(missing or unexpected)} {what} ({shown})")
    bar.update()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    bar.update()
    bar.close()
