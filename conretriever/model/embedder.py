"""Embedder: a Hugging Face backbone + pooling (+ optional LoRA) that maps text to unit vectors.

Pooling turns the backbone's per-token hidden states ``H[b, t, :]`` into one vector per text:

* ``last`` (decoder LLMs, e5-mistral): the hidden state of the last real token. In a causal model
  only the last position has attended to the whole text, so an EOS token is appended to every
  text and its state is the embedding. The EOS is appended by the tokenizer itself (we install a
  post-processor that adds it when the tokenizer does not), so that the saved tokenizer, and
  therefore sentence-transformers loading the saved folder, produce exactly the same ids. The
  last real token is found from the attention mask, so left and right padding both work.
* ``mean``: the average of the real tokens' states (sentence-transformers encoders).
* ``cls``: the first real token's state (BERT-style encoders).

Vectors are L2-normalised (``normalize=True``), so a dot product is the cosine similarity.

``save(dir)`` writes a self-contained folder (LoRA merged, plain HF keys, tokenizer,
``conretriever.json``, sentence-transformers files) that ``from_pretrained`` and
``SentenceTransformer(dir)`` both load; its layout and the merge live in
``conretriever.model.export``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conretriever import runtime
from conretriever.errors import ConfigError, UserError
from conretriever.model import export
from conretriever.model.batching import auto_token_budget, token_budget_batches
from conretriever.model.lora import fuse_lora_forward
from conretriever.model.prompts import format_passage, format_query
from conretriever.model.settings import EmbedderSettings, LoraSettings
from conretriever.model.specs import resolve_model
from conretriever.precision import resolve_dtype
from conretriever.progress import Progress


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[batch, seq, dim] states + [batch, seq] 0/1 mask -> [batch, dim] (any padding side)."""
    mask = attention_mask.to(torch.bool)
    if mode == "last":
        seq_len = mask.shape[1]
        # index of the last 1 in each row: flip, find the first 1, map back.
        last = seq_len - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "cls":
        first = mask.to(torch.int64).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {mode!r}; use last, mean or cls")


def is_decoder_config(config) -> bool:
    """Causal LMs (Llama, Mistral, Gemma, Qwen, ...) but not BERT-likes that also have LM heads."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return False
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def ensure_eos_appended(tokenizer) -> None:
    """Make ``tokenizer(text)`` end with EOS (needed by last-token pooling), keeping whatever
    it already adds (e.g. BOS). Works on fast (Rust) tokenizers by replacing the post-processor;
    the change is saved with the tokenizer, so other libraries reproduce it."""
    from tokenizers import processors

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("last-token pooling needs a tokenizer with an eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id works
    probe = tokenizer("a b").input_ids
    if probe and probe[-1] == eos_id:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__}: cannot append EOS (not a fast tokenizer)")
    plain = tokenizer("a b", add_special_tokens=False).input_ids
    start = next(i for i in range(len(probe)) if probe[i : i + len(plain)] == plain)
    before, after = probe[:start], probe[start + len(plain) :]
    wanted = [*before, *plain, *after, eos_id]
    if hasattr(tokenizer, "add_eos_token"):
        # Llama/Gemma-family tokenizers rebuild their post-processor from these flags (also on
        # reload), so set them to agree with what we want before anything else.
        try:
            tokenizer.add_bos_token = bool(before) and before[0] == tokenizer.bos_token_id
            tokenizer.add_eos_token = True
        except (AttributeError, ValueError):
            pass
        if tokenizer("a b").input_ids == wanted:
            return
    toks = tokenizer.convert_ids_to_tokens
    single = [*toks(before), "$A", *toks(after), tokenizer.eos_token]
    pair = [*single, "$B:1", tokenizer.eos_token + ":1"]
    specials = {t: i for t, i in zip(toks(before + after), before + after, strict=True)}
    specials[tokenizer.eos_token] = eos_id
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items())
    )
    if tokenizer("a b").input_ids != wanted:
        raise ValueError(f"{type(tokenizer).__name__}: failed to make the tokenizer append EOS")


class Embedder(nn.Module):
    """Text -> L2-normalised vectors. Build with :meth:`from_pretrained`."""

    def __init__(self, backbone: nn.Module, tokenizer, settings: EmbedderSettings,
                 head: nn.Sequential | None = None):  # fmt: skip
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        # a sentence-transformers folder's Dense modules after pooling (export.load_dense_head),
        # float32; None for most models. Frozen: LoRA and full fine-tuning train the backbone.
        self.head = head
        if head is not None:
            head.requires_grad_(False)
        # the vector's width: the head's last Linear, else the backbone's hidden size (fixed
        # from here on: nothing replaces the head or resizes the backbone after construction)
        linears = [m for m in head if isinstance(m, nn.Linear)] if head is not None else []
        self._dim = int(linears[-1].out_features if linears else backbone.config.hidden_size)
        # Right padding: real tokens keep the positions they have unpadded (matters for models
        # with absolute positions) and GradCache can trim a chunk to its longest sequence.
        tokenizer.padding_side = "right"
        if settings.pooling == "last":
            ensure_eos_appended(tokenizer)
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike,
        settings: EmbedderSettings | dict | None = None,
        lora: LoraSettings | dict | None = None,
        *,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        keep_layers: int = 0,
    ) -> Embedder:
        """Load a backbone from any model spec (see ``conretriever.model.specs``).

        ``settings``: the fields that are set override the model's own (its ``conretriever.json``,
        a sentence-transformers pooling config, else :meth:`EmbedderSettings.defaults_for` the
        architecture). ``lora``: wrap the backbone in a new LoRA adapter. The load options:
        ``dtype`` (``auto``: bf16 where native, see ``conretriever.precision``), ``device``,
        ``attn_implementation`` (None: transformers' choice, SDPA where supported),
        ``gradient_checkpointing`` and ``keep_layers`` (N > 0: only the first N transformer
        layers, see :func:`keep_first_layers`; before LoRA, so the adapters are theirs).
        """
        from transformers import AutoConfig, AutoModel

        from conretriever.model.tokenizer_files import load_tokenizer

        if isinstance(settings, dict):
            settings = EmbedderSettings(**settings)
        if isinstance(lora, dict):
            lora = LoraSettings(**lora)
        path = resolve_model(spec)
        with _not_a_model(spec):
            config = AutoConfig.from_pretrained(path)
        defaults = EmbedderSettings.defaults_for(
            decoder=is_decoder_config(config),
            bidirectional=bool(getattr(config, "use_bidirectional_attention", False)),
        )
        base = export.saved_settings(path)
        # a saved file may leave fields out: fill them as for a new model
        base = defaults if base is None else base.over(defaults)
        effective = settings.over(base) if settings is not None else base
        if effective.bidirectional != defaults.bidirectional:
            config = _with_attention(config, path, bool(effective.bidirectional), spec)

        dev = torch.device(device) if device else runtime.default_device()
        kwargs = {"dtype": resolve_dtype(dtype, dev)}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with _not_a_model(spec):
            backbone, info = AutoModel.from_pretrained(
                path, config=config, output_loading_info=True, **kwargs
            )
            tokenizer = load_tokenizer(path)
        _refuse_missing_weights(spec, info)
        if keep_layers:
            keep_first_layers(backbone, keep_layers)
        if gradient_checkpointing:
            set_activation_checkpointing(backbone, True)
        if hasattr(backbone.config, "use_cache"):
            backbone.config.use_cache = False  # no KV cache: we never generate
        if lora is not None:
            backbone = apply_lora(backbone, lora)
        model = cls(backbone, tokenizer, effective, export.load_dense_head(path))
        return model.to(dev)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dim(self) -> int:
        """Floats per vector (before any truncation an encode call asks for)."""
        return self._dim

    @property
    def base_model(self) -> nn.Module:
        """The HF model without the PEFT wrapper."""
        get = getattr(self.backbone, "get_base_model", None)
        return get() if get else self.backbone

    # ----- text -> ids -> vectors --------------------------------------------------------------
    def format(self, texts: list[str], role: str, instruction: str | None = None) -> list[str]:
        fmt = self.settings.prompt_format
        if role == "query":
            inst = instruction if instruction is not None else self.settings.default_instruction
            fixed = self.settings.query_prompt
            return [format_query(t, inst, fmt, fixed) for t in texts]
        if role in ("passage", "document"):
            fixed = self.settings.document_prompt
            return [format_passage(t, fmt, fixed) for t in texts]
        raise ValueError(f"role must be 'query' or 'passage', got {role!r}")

    def tokenize(self, texts: list[str], max_length: int, padding: bool = True):
        """Token ids with special tokens (EOS last for ``last`` pooling), truncated so the
        special tokens survive, padded to the longest text of the batch."""
        return self.tokenizer(
            list(texts),
            max_length=max_length,
            truncation=True,
            padding=padding,
            return_tensors="pt" if padding else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        packed_ids: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """[batch, seq] ids + mask -> [batch, dim] float32 embeddings (unit length if
        normalize); or ``packed_ids`` (id lists) -> [n, dim] through one padding-free forward
        (see :meth:`forward_packed`). Both go through ``__call__``, so module hooks (FSDP2's
        weight gathering) run either way."""
        if packed_ids is not None:
            return self._packed_forward(packed_ids)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        emb = pool(out.last_hidden_state, attention_mask, self.settings.pooling)
        return self._finish(emb)

    def _finish(self, emb: torch.Tensor) -> torch.Tensor:
        """Pooled states -> the model's vectors: float32 (similarities and the loss are computed
        in at least fp32), through the Dense head if the model has one, unit length if
        ``normalize``."""
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()
        if self.head is not None:
            weight = next(self.head.parameters())
            emb = self.head(emb.to(weight.dtype)).float()
        if self.settings.normalize:
            emb = nn.functional.normalize(emb, p=2, dim=-1)
        return emb

    def forward_packed(self, seqs: list[list[int]]) -> torch.Tensor:
        """Id lists -> [n, dim] float32 embeddings from ONE padding-free forward (decoders only;
        see ``conretriever.model.packing``): the texts are concatenated, positions restart per text
        and
        attention stays inside each text, so each vector equals the padded forward's."""
        return self(packed_ids=seqs)

    def _packed_forward(self, seqs: list[list[int]]) -> torch.Tensor:
        from conretriever.model.packing import pack, packed_attention, pool_packed

        ids, positions, cu, longest = pack(seqs)
        dev = self.device
        cu = cu.to(dev)
        with packed_attention(self.base_model):
            out = self.backbone(
                input_ids=ids.to(dev),
                position_ids=positions.to(dev),
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=longest,
                max_length_k=longest,
            )
        emb = pool_packed(out.last_hidden_state[0], cu, self.settings.pooling)
        return self._finish(emb)

    def packing_supported(self) -> bool:
        """Packed forwards compute this model exactly: a decoder with plain causal attention."""
        from conretriever.model.packing import packable

        config = self.base_model.config
        return is_decoder_config(config) and packable(config)

    def packing_default(self) -> bool:
        """Pack encoding batches by default where it pays: a GPU with the varlen attention
        kernel. (On a CPU, length-sorted padded batches are as fast: little padding is left.)"""
        from conretriever.model.packing import varlen_kernel_available

        return self.packing_supported() and varlen_kernel_available(self.device)

    def packed_training_default(self) -> bool:
        """Pack training chunks by default where it pays: on a GPU with the varlen kernel, and on
        a CPU, where removing the padding of randomly ordered documents makes a LoRA step on
        Gemma-3-270M ~15% faster even through the per-text attention loop."""
        from conretriever.model.packing import varlen_kernel_available

        if not self.packing_supported():
            return False
        return self.device.type == "cpu" or varlen_kernel_available(self.device)

    @torch.no_grad()
    def encode(
        self,
        texts: list[str],
        role: str = "query",
        instruction: str | None = None,
        batch_size: int = 256,
        max_length: int | None = None,
        show_progress: bool | None = None,
        max_tokens: int | None | str = "auto",
        packed: bool | None = None,
        truncate: bool = True,
    ) -> np.ndarray:
        """Encode texts as queries (with instruction) or passages; returns float32 [n, dim]
        (``[n, truncate_dim]`` when the settings truncate and ``truncate``: see
        :func:`truncate_vectors`).

        Texts are tokenized once, sorted by length (longest first) and grouped into batches by a
        TOKEN budget: a batch holds at most ``max_tokens`` padded tokens (sequences x the
        batch's longest length) and at most ``batch_size`` sequences, so a batch is many short
        texts or a few long ones and the work per forward stays about constant. Each batch is
        right padded only to its own longest text; after sorting, neighbours have nearly equal
        lengths, so little compute is spent on padding. ``max_tokens="auto"`` is 16,384 tokens
        on a GPU and, on a CPU, 1,024 in fp32 and 4,096 in bf16 (see :func:`auto_token_budget`);
        ``None`` gives fixed batches of ``batch_size`` (still sorted). Batching never changes a
        vector beyond float rounding (right padding keeps every real token's position and the
        mask hides the padding), and the output rows follow the input order.

        ``packed`` (default: on for decoders on a GPU with PyTorch's varlen attention kernel)
        removes the padding altogether: a batch is ONE row of concatenated texts holding at most
        ``max_tokens`` real tokens, with attention kept inside each text (see
        ``conretriever.model.packing``). Same vectors, up to float rounding.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length is None:
            s = self.settings
            max_length = s.query_max_length if role == "query" else s.doc_max_length
        keep = self.settings.truncate_dim if truncate else 0
        if not texts:  # the tokenizer rejects an empty batch
            return np.zeros((0, keep or self.dim), dtype=np.float32)
        formatted = self.format(list(texts), role, instruction)
        ids = self.tokenize(formatted, max_length, padding=False)["input_ids"]
        out = self._encode_ids(
            ids, batch_size, max_tokens, show_progress, desc=f"encode {role}", packed=packed
        )
        return truncate_vectors(out, keep, self.settings.normalize)

    @torch.no_grad()
    def _encode_ids(
        self,
        ids: list[list[int]],
        batch_size: int,
        max_tokens: int | None | str,
        show_progress: bool | None = None,
        desc: str = "encode",
        packed: bool | None = None,
    ) -> np.ndarray:
        """Token id lists (special tokens included) -> float32 [n, dim], in input order.

        The batching half of :meth:`encode`, separate so benchmarks can feed exact token counts.
        """
        if max_tokens == "auto":
            max_tokens = auto_token_budget(self.device, next(self.backbone.parameters()).dtype)
        if packed is None:
            packed = self.packing_default()
        elif packed and not is_decoder_config(self.base_model.config):
            raise ValueError("packed encoding needs a decoder (causal attention); use packed=False")
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        batches = token_budget_batches([len(x) for x in ids], batch_size, max_tokens, packed)
        real = len(batches)
        batches = _as_many_as_every_rank(batches)
        if show_progress is None:
            show_progress = len(batches) > 4
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.training
        self.eval()
        bar = Progress(len(ids), desc, enabled=show_progress, unit="texts")
        try:
            for number, idx in enumerate(batches):
                seqs = [ids[i] for i in idx]
                with _autocast(self.device):
                    if packed:
                        emb = self.forward_packed(seqs)
                    else:
                        input_ids, mask = _pad_right(seqs, pad_id)
                        emb = self(input_ids.to(self.device), mask.to(self.device))
                if number >= real:  # a repeat to match other ranks (see above): discarded
                    continue
                out[idx] = emb.float().cpu().numpy()
                bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        return out

    # ----- save (see conretriever.model.export)
    # ------------------------------------------------------
    def save(
        self,
        out_dir: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        settings: EmbedderSettings | None = None,
    ) -> Path:
        """Write a self-contained model folder (merged weights, tokenizer, settings, ST files).

        Written into ``<out_dir>.tmp`` and renamed, so a crash never leaves a folder that loads
        but holds half the weights. ``dtype`` casts the floating-point weights (e.g. bfloat16);
        ``settings`` replaces the settings the folder records (default: this model's).
        """
        return export.save_folder(self, out_dir, state_dict, dtype, settings)


def truncate_vectors(vectors: np.ndarray, keep: int | None, normalize: bool = True) -> np.ndarray:
    """The first ``keep`` dimensions of each row (all when 0/None), re-normalised to unit length
    when the model normalises: a Matryoshka-trained model's prefixes are embeddings of their
    own, and cosine = dot product holds at every size."""
    if not keep or keep >= vectors.shape[1]:
        return vectors
    out = np.ascontiguousarray(vectors[:, :keep], dtype=np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _as_many_as_every_rank(batches: list[list[int]]) -> list[list[int]]:
    """Under torchrun, as many batches as the rank with the most: an FSDP-sharded model
    all-gathers its weights in every forward, so a rank that stopped early would hang the
    others. The extra batches repeat this rank's first one and their output is discarded."""
    if not runtime.is_distributed() or not batches:
        return batches
    (count,) = runtime.most_over_ranks(len(batches))
    return batches + [batches[0]] * (count - len(batches))


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Id lists -> ([n, longest] int64 ids, [n, longest] 0/1 mask), padded on the right so every
    real token keeps the position it has alone (the reference the batched vectors must match)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation (gradient) checkpointing of a transformers model on or off. transformers 5.2x
    names it ``activation_checkpointing_*`` and deprecates the ``gradient_checkpointing_*``
    names that earlier 5.x releases (e.g. 5.17 on our GPU machines) only have. Non-reentrant:
    the form that works when the inputs need no gradient (frozen embeddings under LoRA)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    else:
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()


def is_activation_checkpointing(model: nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    name = "is_activation_checkpointing" if flag is not None else "is_gradient_checkpointing"
    return bool(getattr(model, name))


def linear_module_names(backbone: nn.Module, under: str = "") -> list[str]:
    """The distinct last names of the backbone's linear layers (``q_proj``, ``down_proj``...,
    GPT-2's ``Conv1D`` too), those inside the module ``under`` when given: what
    ``--lora_target_modules`` may name."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    prefix = f"{under}." if under else ""
    linear = (
        name
        for name, m in backbone.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and name.startswith(prefix)
    )
    return sorted({name.rsplit(".", 1)[-1] for name in linear})


def _text_config(config):
    """The config of the text model: a multimodal config's text part, else ``config``."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_stack(backbone: nn.Module, flag: str = "--lora_top_layers") -> tuple[str, int]:
    """The dotted name and length of the backbone's stack of transformer layers (``layers`` in
    a decoder, ``encoder.layer`` in BERT): the one ``nn.ModuleList`` as long as the config's
    ``num_hidden_layers`` (of the text model, for a multimodal config). No guessing: a model
    with none, or several (a vision tower of the same depth), is refused in one line, which
    names ``flag``, the option that asked."""
    text = _text_config(getattr(backbone, "config", None))
    count = getattr(text, "num_hidden_layers", None)
    stacks = [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == count
    ]
    if count is None or len(stacks) != 1:
        found = f"{len(stacks)} lists of {count} layers" if count else "no num_hidden_layers"
        raise ConfigError(
            f"{flag}: cannot tell the layer stack of {type(backbone).__name__} "
            f"({found} in its config and modules); use 0 (every layer)"
        )
    return stacks[0], count


def keep_first_layers(backbone: nn.Module, keep: int) -> None:
    """Cut the backbone to its first ``keep`` transformer layers, in place (``--keep_layers``).

    The last layers of a decoder LLM serve next-token prediction; an embedding can be read
    from the middle of the stack, and contrastive training adapts the layers kept (pruning
    the last ~30% costs little after fine-tuning: Thennal et al., 2024, "Large Language
    Models Are Overparameterized Text Encoders"). Every forward and backward pass then costs
    about ``keep / layers`` of the whole model's, in training and at inference alike. The
    model's final norm still runs on the last layer kept. The config follows (its
    ``num_hidden_layers`` and, where the model has one, its per-layer ``layer_types``), so a
    saved folder is a plain checkpoint of the smaller model for any loader."""
    stack, count = layer_stack(backbone, "--keep_layers")
    if not 1 <= keep <= count:
        raise ConfigError(
            f"--keep_layers {keep}: {type(backbone).__name__} has {count} layers ({stack}); "
            f"use 0 (all) or 1 to {count}"
        )
    layers = backbone.get_submodule(stack)
    del layers[keep:]
    text = _text_config(backbone.config)
    text.num_hidden_layers = keep
    types = getattr(text, "layer_types", None)
    if isinstance(types, list) and len(types) == count:
        text.layer_types = types[:keep]


def _layer_range(backbone: nn.Module, lora: LoraSettings, targets):
    """``(targets, peft layer-range kwargs)`` for ``lora.top_layers``: the last N layers of
    the stack (:func:`layer_stack`), with ``all-linear`` spelt out as the names of the linear
    modules inside it (peft takes a layer range with a list of names only)."""
    if not lora.top_layers:
        return targets, {}
    stack, count = layer_stack(backbone)
    if lora.top_layers > count:
        raise ConfigError(
            f"--lora_top_layers {lora.top_layers}: {type(backbone).__name__} has only "
            f"{count} layers ({stack}); use 0 (every layer) or at most {count}"
        )
    if targets == "all-linear":
        targets = linear_module_names(backbone, under=stack)
        if not targets:
            raise ConfigError(
                f"--lora_top_layers {lora.top_layers}: no linear module in the layers of "
                f"{stack} of {type(backbone).__name__}; name them with --lora_target_modules"
            )
    else:  # a dotted path peft would match exactly, ignoring the layer range: refused
        dotted = [t for t in targets if "." in t]
        if dotted:
            raise ConfigError(
                f"--lora_top_layers with --lora_target_modules {dotted[0]}: give module "
                "names (q_proj), not paths; the layer range picks the layers"
            )
    layers = {
        "layers_to_transform": list(range(count - lora.top_layers, count)),
        "layers_pattern": stack.rsplit(".", 1)[-1],
    }
    return targets, layers


def apply_lora(backbone: nn.Module, lora: LoraSettings) -> nn.Module:
    """``backbone`` wrapped in a new LoRA adapter on ``lora.target_modules`` (of the last
    ``lora.top_layers`` layers only, when set: no weight below them trains, so autograd stops
    the backward pass at the first adapted layer, and a step costs the forward pass plus the
    backward of those layers alone).

    Each adapted layer runs the fused forward of ``conretriever.model.lora`` (peft's sum, one
    ``addmm`` instead of three passes over the layer's output).

    A module name the model does not have is checked here, before peft sees it (peft's own
    ValueError would surface as a traceback), with peft's matching rule: ``name`` matches a
    module whose dotted path is ``name`` or ends in ``.name``. Whatever else peft refuses (a
    module of a type LoRA cannot wrap, say) becomes the same one-line :class:`ConfigError`."""
    from peft import LoraConfig, get_peft_model

    targets = lora.modules()
    if targets != "all-linear":
        paths = [name for name, _ in backbone.named_modules()]
        missing = [t for t in targets if not any(p == t or p.endswith(f".{t}") for p in paths)]
        if missing or not targets:
            raise ConfigError(
                f"--lora_target_modules: {', '.join(missing) or repr(lora.target_modules)}: "
                f"no such module in {type(backbone).__name__}; its linear modules are "
                f"{', '.join(linear_module_names(backbone))} (or use all-linear)"
            )
    targets, layers = _layer_range(backbone, lora, targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        **layers,
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``; not our call to fix
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        try:
            model = get_peft_model(backbone, config)
        except ValueError as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"--lora_target_modules {lora.target_modules}: {first}; the linear modules of "
                f"{type(backbone).__name__} are {', '.join(linear_module_names(backbone))}"
            ) from None
    if lora.top_layers:
        # Activation checkpointing makes the embeddings' output need a gradient (transformers
        # and peft each hook it, for the reentrant form), which would run the backward through
        # every frozen layer again; ours is non-reentrant and needs none. Registered last, this
        # hook hands the layers a tensor outside the graph, whatever the earlier hooks did.
        model.get_base_model().get_input_embeddings().register_forward_hook(_outside_the_graph)
    fuse_lora_forward(model)  # the adapter summed inside the layer's GEMM: see model/lora.py
    return model


def _outside_the_graph(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


def _with_attention(config, path, bidirectional: bool, spec):
    """The architecture config reloaded with ``use_bidirectional_attention`` set (passed to the
    config's constructor, which derives other fields from it: Gemma-3 halves its sliding window
    into a window on both sides). Refused, with one line, for architectures without the option."""
    from transformers import AutoConfig

    if not hasattr(config, "use_bidirectional_attention"):
        raise ConfigError(
            f"--bidirectional: {spec} ({type(config).__name__}) has no bidirectional attention "
            "option; it exists for Gemma-3 (use_bidirectional_attention)"
        )
    return AutoConfig.from_pretrained(path, use_bidirectional_attention=bidirectional)


# Weights a checkpoint may lack without changing a vector: BERT's pooler (a dense layer over the
# [CLS] state that no pooling mode here reads) is absent from many sentence-transformers saves.
UNUSED_WEIGHTS = ("pooler.",)


def _refuse_missing_weights(spec, info: dict) -> None:
    """transformers random-initialises any weight its checkpoint lacks and only prints a table:
    a folder of the wrong architecture, or with renamed keys, would then load "fine" and encode
    noise (nDCG ~0). Refuse instead, naming what is missing."""
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(UNUSED_WEIGHTS)]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError(
            f"{spec}: {len(missing)} weights of the model are not in its checkpoint ({shown}); "
            "they would start at random. Is it the right folder, and a checkpoint of this "
            "architecture?"
        )


@contextmanager
def _not_a_model(spec) -> Iterator[None]:
    """transformers' refusals of a folder or hub id that is not a loadable model (a
    config.json without ``model_type``, no weights file, no tokenizer, an unreachable hub) as
    one line naming the spec. They are ``OSError`` (missing files, no network) or ``ValueError``
    (an unrecognised config); the first line of transformers' message says which file."""
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{spec}: cannot load it as a model: {first}") from None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
