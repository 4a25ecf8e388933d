"""A saved model folder: what ``Embedder.save`` writes and ``Embedder.from_pretrained`` reads back.

The folder is a plain Hugging Face checkpoint that also loads in sentence-transformers::

    model.safetensors          backbone weights, LoRA merged in (sharded past 5GB, with
                               model.safetensors.index.json)
    config.json                the backbone's HF config (architectures = the bare AutoModel class)
    tokenizer.json, ...        the tokenizer, with the EOS-appending post-processor installed for
                               ``last`` pooling, so any loader produces the same ids
    conretriever.json          EmbedderSettings: pooling, normalize, prompt format, default
                               instruction, max lengths per role
    modules.json               sentence-transformers pipeline: Transformer -> Pooling (-> Normalize)
    1_Pooling/config.json      the pooling mode and embedding dimension
    2_Normalize/               present when vectors are L2-normalised
    sentence_bert_config.json  max_seq_length (the larger of the two roles')
    config_sentence_transformers.json   the query and document prompts

so ``AutoModel.from_pretrained(dir)``, ``SentenceTransformer(dir)`` and ``Embedder.from_pretrained``
all see the same model and produce the same vectors.

Why the weight keys carry no wrapper prefixes: a PEFT-wrapped backbone's state dict names a
weight ``base_model.model.layers.0.self_attn.q_proj.base_layer.weight`` and stores the adapter
beside it as ``...q_proj.lora_A.default.weight`` / ``lora_B``. A loader that knows nothing of
PEFT (transformers' ``AutoModel``, sentence-transformers) looks for
``layers.0.self_attn.q_proj.weight``, finds none of its names and, with no more than a warning,
starts from random weights. So the keys are fixed at save time, never by a later rewrite of the
files: :func:`merged_state_dict` folds each adapter into its base weight by key arithmetic,

    W' = W + (B @ A) * scale,   scale = alpha / r   (alpha / sqrt(r) with rsLoRA),

in float32, cast back to W's dtype, strips the ``base_model.model.`` and ``.base_layer`` parts of
the name and drops the ``lora_`` tensors. It works on any state dict keyed like
``backbone.state_dict()``, including a full one gathered from FSDP shards, and mutates nothing
(peft's ``merge_and_unload`` would rewrite the live training model).

Reading (:func:`saved_settings`) restores the settings from ``conretriever.json``, or, for a
sentence-transformers folder we did not write, infers pooling, normalisation and max length from
its pooling config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from conretriever.model.prompts import document_prefix, query_prefix
from conretriever.model.settings import DEFAULT_MAX_LENGTH, EmbedderSettings


class SavableModel(Protocol):
    """What :func:`save_folder` reads of an ``Embedder`` (which imports this module)."""

    backbone: nn.Module
    base_model: nn.Module
    tokenizer: object
    settings: EmbedderSettings
    dim: int


SETTINGS_FILE = "conretriever.json"


def merged_state_dict(
    backbone: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict:
    """Backbone weights with LoRA folded in (W + B @ A * alpha / r) under plain HF keys.

    ``state_dict`` may be given (e.g. a full state dict gathered from FSDP shards, keyed like
    ``backbone.state_dict()``); otherwise the live weights are used. Nothing is mutated.
    """
    sd = dict(backbone.state_dict() if state_dict is None else state_dict)
    peft_config = getattr(backbone, "peft_config", None)
    if peft_config:
        cfg = peft_config["default"]
        scale = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        prefix = "base_model.model."
        merged = {}
        for key, value in sd.items():
            if ".lora_" in key:
                continue
            name = key[len(prefix) :] if key.startswith(prefix) else key
            if ".base_layer." in name:
                layer = key.split(".base_layer.")[0]
                a = sd.get(f"{layer}.lora_A.default.weight")
                b = sd.get(f"{layer}.lora_B.default.weight")
                name = name.replace(".base_layer.", ".")
                if a is not None and b is not None and name.endswith(".weight"):
                    delta = (b.float() @ a.float()) * scale
                    value = (value.float() + delta.to(value.device)).to(value.dtype)
            merged[name] = value
        sd = merged
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_folder(
    embedder: SavableModel,
    out_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    settings: EmbedderSettings | None = None,
) -> Path:
    """Write a self-contained model folder (merged weights, tokenizer, settings, ST files).

    Written into ``<out_dir>.tmp`` and renamed, so a crash never leaves a folder that loads
    but holds half the weights. ``settings``: what the folder records (pooling, prompts,
    lengths), when not the embedder's own (a model trained on short documents that is to read
    longer ones).
    """
    settings = settings or embedder.settings
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = merged_state_dict(embedder.backbone, state_dict)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    _write_safetensors(sd, tmp)
    config = embedder.base_model.config
    config.architectures = [type(embedder.base_model).__name__]
    config.save_pretrained(tmp)
    embedder.tokenizer.save_pretrained(tmp)
    (tmp / SETTINGS_FILE).write_text(json.dumps(_settings_dict(settings), indent=2) + "\n")
    head = getattr(embedder, "head", None)
    dense = _write_dense_head(tmp, head) if head is not None else []
    hidden = int(embedder.base_model.config.hidden_size)  # what pooling reads
    _write_sentence_transformers_files(tmp, settings, hidden, dense)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _settings_dict(settings: EmbedderSettings) -> dict:
    """What ``conretriever.json`` holds; ``truncate_dim`` only when it truncates, and
    ``bidirectional`` and the prompts only when set, so folders
    saved before the setting existed and those saved since without it are the same bytes."""
    values = asdict(settings)
    # written only when set (same reason)
    for optional in ("truncate_dim", "bidirectional", "query_prompt", "document_prompt"):
        if not values.get(optional):
            values.pop(optional, None)
    return values


def saved_settings(path: str) -> EmbedderSettings | None:
    """The settings stored in a model folder, or None when it has neither ``conretriever.json``
    nor a sentence-transformers pooling config (then the caller picks defaults)."""
    folder = Path(path)
    if (folder / SETTINGS_FILE).exists():
        return EmbedderSettings.from_dict(json.loads((folder / SETTINGS_FILE).read_text()))
    pooling_cfg = folder / "1_Pooling" / "config.json"
    if pooling_cfg.exists():  # a sentence-transformers folder we did not write
        cfg = json.loads(pooling_cfg.read_text())
        mode = (
            "last"
            if cfg.get("pooling_mode_lasttoken")
            else "cls"
            if cfg.get("pooling_mode_cls_token")
            else "mean"
        )
        normalize = (folder / "2_Normalize").exists() or any(
            "Normalize" in m.get("type", "")
            for m in json.loads((folder / "modules.json").read_text())
        )
        max_len = DEFAULT_MAX_LENGTH  # for a folder that does not state one
        sbert = folder / "sentence_bert_config.json"
        if sbert.exists():
            max_len = int(json.loads(sbert.read_text()).get("max_seq_length", max_len))
        query_prompt, document_prompt = _stated_prompts(folder)
        return EmbedderSettings(
            pooling=mode,
            normalize=normalize,
            prompt_format="none",
            query_prompt=query_prompt,
            document_prompt=document_prompt,
            query_max_length=max_len,
            doc_max_length=max_len,
        )
    return None


# the activations sentence-transformers' Dense modules are saved with that a head can apply
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": nn.Identity,
    "torch.nn.modules.activation.Tanh": nn.Tanh,
}


def load_dense_head(path: str | os.PathLike) -> nn.Sequential | None:
    """The ``Dense`` modules of a sentence-transformers folder, in pipeline order, as one float32
    ``nn.Sequential`` applied to the pooled vector before normalisation (EmbeddingGemma projects
    its 768-dim mean 768 -> 3072 -> 768 this way); None when ``modules.json`` lists none.

    A module of another kind between pooling and normalisation, or an activation other than
    identity or tanh, is refused in one line: the vectors would not be the model's."""
    folder = Path(path)
    listing = folder / "modules.json"
    if not listing.exists():
        return None
    try:
        modules = json.loads(listing.read_text())
        types = [(m["type"].rsplit(".", 1)[-1], m.get("path", "")) for m in modules]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{listing}: not a list of modules with 'type' fields ({e})") from None
    known = {"Transformer", "Pooling", "Dense", "Normalize"}
    other = [t for t, _ in types if t not in known]
    if other:
        raise ValueError(f"{listing}: module {other[0]!r} is not supported (only "
                         f"{', '.join(sorted(known))})")  # fmt: skip
    # sentence-transformers applies each module to the previous one's output: a Dense before
    # Pooling would act on token vectors, one after Normalize on the unit vector. We apply the
    # head to the pooled vector and normalise last, so only that order gives its vectors.
    kinds = [t for t, _ in types]
    layers: list[nn.Module] = []
    for position, (kind, sub) in enumerate(types):
        if kind != "Dense":
            continue
        before_pooling = "Pooling" not in kinds[:position]
        if before_pooling or "Normalize" in kinds[:position]:
            where = "before Pooling" if before_pooling else "after Normalize"
            raise ValueError(f"{listing}: Dense module {sub!r} comes {where}; only Dense "
                             "modules between Pooling and Normalize are supported")  # fmt: skip
        layers.extend(_dense_layer(folder / sub))
    return nn.Sequential(*layers) if layers else None


def _dense_layer(folder: Path) -> list[nn.Module]:
    from safetensors.torch import load_file

    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        n_in, n_out = int(cfg["in_features"]), int(cfg["out_features"])
        bias = bool(cfg.get("bias", True))
        activation = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: not a Dense config ({e})") from None
    if activation not in _DENSE_ACTIVATIONS:
        raise ValueError(f"{cfg_file}: field 'activation_function' {activation!r} is not "
                         f"supported (one of: {', '.join(_DENSE_ACTIVATIONS)})")  # fmt: skip
    if (folder / "model.safetensors").exists():
        weights = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").exists():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{folder}: a Dense module without model.safetensors")
    linear = nn.Linear(n_in, n_out, bias=bias)
    state = {k.removeprefix("linear."): v.float() for k, v in weights.items()}
    try:
        linear.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"{folder}: weights do not fit the Dense config ({first})") from None
    return [linear, _DENSE_ACTIVATIONS[activation]()]


def _write_dense_head(folder: Path, head: nn.Sequential) -> list[str]:
    """``head`` as sentence-transformers Dense module folders ``<i>_Dense``; their paths."""
    from safetensors.torch import save_file

    names = {cls: name for name, cls in _DENSE_ACTIVATIONS.items()}
    layers = list(head)
    paths = []
    for i in range(0, len(layers), 2):
        linear, act = layers[i], layers[i + 1]
        path = f"{2 + i // 2}_Dense"
        (folder / path).mkdir()
        cfg = {"in_features": linear.in_features, "out_features": linear.out_features,
               "bias": linear.bias is not None,
               "activation_function": names[type(act)]}  # fmt: skip
        (folder / path / "config.json").write_text(json.dumps(cfg, indent=2))
        state = {f"linear.{k}": v.detach().float().contiguous().cpu()
                 for k, v in linear.state_dict().items()}  # fmt: skip
        save_file(state, str(folder / path / "model.safetensors"))
        paths.append(path)
    return paths


def _stated_prompts(folder: Path) -> tuple[str | None, str | None]:
    """The query and document prompts a sentence-transformers folder states (its
    ``config_sentence_transformers.json``: ``prompts.query`` and ``prompts.document``, the names
    MTEB applies to retrieval), or None for a role it states none (or an empty one) for."""
    file = folder / "config_sentence_transformers.json"
    if not file.exists():
        return None, None
    try:
        prompts = json.loads(file.read_text()).get("prompts") or {}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file}: not a JSON object ({e})") from None
    if not isinstance(prompts, dict):
        raise ValueError(f"{file}: field 'prompts' is not an object")
    query = prompts.get("query") or None
    document = prompts.get("document") or prompts.get("passage") or None
    for name, value in (("query", query), ("document", document)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{file}: field 'prompts.{name}' is not a string")
    return query, document


def _write_safetensors(sd: dict[str, torch.Tensor], folder: Path, max_shard: str = "5GB") -> None:
    """``sd`` as ``model.safetensors``, or as shards plus ``model.safetensors.index.json`` when
    it exceeds ``max_shard`` (5GB: huggingface_hub's default shard size)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_sentence_transformers_files(folder: Path, s: EmbedderSettings, dim: int,
                                      dense: list[str] = ()) -> None:  # fmt: skip
    """``modules.json``, ``1_Pooling/``, ``2_Normalize/``, ``sentence_bert_config.json`` and
    ``config_sentence_transformers.json`` (prompts), so ``SentenceTransformer(folder)`` pools,
    normalises and prefixes exactly as ``Embedder`` does."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    for path in dense:  # a projection after pooling (written by _write_dense_head)
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": path,
                        "type": "sentence_transformers.models.Dense"})  # fmt: skip
    if s.normalize:
        i = len(modules)
        path = "2_Normalize" if not dense else f"{i}_Normalize"
        modules.append({"idx": i, "name": str(i), "path": path,
                        "type": "sentence_transformers.models.Normalize"})  # fmt: skip
        (folder / path).mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": s.pooling == "cls",
        "pooling_mode_mean_tokens": s.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": s.pooling == "last",
        "include_prompt": True,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    # sentence-transformers has one max_seq_length for both roles: use the larger one.
    sbert = {"max_seq_length": max(s.query_max_length, s.doc_max_length), "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))
    prompts = {
        "query": query_prefix(s.default_instruction, s.prompt_format, s.query_prompt),
        "document": document_prefix(s.prompt_format, s.document_prompt),
    }
    st_config = {
        "prompts": prompts,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
    }
    if s.truncate_dim:  # SentenceTransformer(folder) truncates the same way (after Normalize)
        st_config["truncate_dim"] = s.truncate_dim
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
