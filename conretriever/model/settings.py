"""What, besides the weights, decides a vector (:class:`EmbedderSettings`); and LoRA settings.

Both live here once. The run config holds them as they are (``model.embedder``, ``model.lora``),
``Embedder.from_pretrained(spec, settings, lora)`` takes them, the collator reads the model's,
and ``Embedder.save`` writes the embedder settings as ``conretriever.json`` beside the weights.
Adding a setting is an edit of this file (and of whatever uses the new value).

A field left ``None`` keeps the model's own value: what its ``conretriever.json`` says, else a
sentence-transformers folder's pooling config, else the default for the architecture
(:meth:`EmbedderSettings.defaults_for`: last-token pooling and e5 prompts for decoders, mean
pooling and no prompt for encoders, 512 tokens per role).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from conretriever.options import opt

Pooling = Literal["last", "mean", "cls"]
PromptFormat = Literal["e5", "plain", "prefix", "none"]
DEFAULT_MAX_LENGTH = 512  # tokens per role for a model that states none (the e5-mistral recipe)


@dataclass
class EmbedderSettings:
    """Pooling, normalisation, prompts and lengths; ``None`` = the model's own (see module)."""

    pooling: Pooling | None = opt(
        None, help="last (decoders), mean or cls; none: the saved model's, else by architecture"
    )
    normalize: bool | None = opt(None, help="L2-normalise vectors (cosine = dot product)")
    prompt_format: PromptFormat | None = opt(
        None,
        help="e5: 'Instruct: {instruction}\\nQuery: {query}'; plain: '{instruction}\\n{query}' "
        "(the seed's); prefix: 'query: ' / 'passage: '; none: texts as given",
    )
    default_instruction: str | None = opt(
        None, help="query instruction when none is given (encode role=query)"
    )
    query_prompt: str | None = opt(
        None,
        help="the model's own text before every query, instead of the prompt format's (it "
        "then takes no instruction), e.g. EmbeddingGemma's 'task: search result | query: '; "
        "none: the format's",
    )
    document_prompt: str | None = opt(
        None,
        help="the model's own text before every document, instead of the format's, e.g. "
        "EmbeddingGemma's 'title: none | text: '; none: the format's",
    )
    query_max_length: int | None = opt(
        None, ge=1, help="query tokens, instruction and appended EOS included"
    )
    doc_max_length: int | None = opt(None, ge=1, help="document tokens, appended EOS included")
    truncate_dim: int | None = opt(
        None, ge=0, help="keep the first N dims of each vector, re-normalised (Matryoshka; 0: all)"
    )
    bidirectional: bool | None = opt(
        None,
        help="decoder attention sees the whole text (Gemma-3's use_bidirectional_attention); "
        "none: the model's own config",
    )

    @classmethod
    def defaults_for(cls, decoder: bool, bidirectional: bool = False) -> EmbedderSettings:
        """Every field concrete: what a model with no saved settings gets (``bidirectional``:
        what its architecture config says)."""
        return cls(
            pooling="last" if decoder else "mean",
            normalize=True,
            prompt_format="e5" if decoder else "none",
            default_instruction=None,
            query_max_length=DEFAULT_MAX_LENGTH,
            doc_max_length=DEFAULT_MAX_LENGTH,
            truncate_dim=0,
            bidirectional=bidirectional,
        )

    def over(self, base: EmbedderSettings) -> EmbedderSettings:
        """``base`` with every field that is set here (not None) replaced by this one's."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(base, **given)

    @classmethod
    def from_dict(cls, data: dict) -> EmbedderSettings:
        """From a ``conretriever.json``; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LoraSettings:
    """A LoRA adapter on the backbone (peft): ``W' = W + (B @ A) * alpha / r``."""

    r: int = opt(16, ge=1, help="adapter rank")
    alpha: int = opt(32, ge=1, help="scale numerator: alpha / r = 2 is the e5-mistral setting")
    dropout: float = opt(0.1, ge=0, le=0.9, help="dropout on the adapter's input")
    target_modules: str = opt(
        "all-linear", help="all-linear, or comma-separated module names (q_proj,v_proj)"
    )
    top_layers: int = opt(
        0,
        ge=0,
        help="0: adapt every layer; N: only the last N transformer layers (the layers below "
        "are frozen and need no backward pass: a faster step)",
    )

    def modules(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]
