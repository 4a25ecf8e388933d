"""Prompts: how an instruction reaches the text a model encodes.

Queries get the task's instruction in the model's prompt format; documents get none (only a
``passage: `` prefix in the ``prefix`` format), so one document index serves every task:

* ``e5`` (the official e5-mistral format): ``Instruct: {instruction}\\nQuery: {query}``;
* ``plain`` (the seed project's): ``{instruction}\\n{query}``;
* ``prefix`` (E5-v2 style encoders): ``query: {query}`` / ``passage: {text}``;
* ``none``: texts as given (sentence-transformers encoders such as all-MiniLM-L6-v2).

A model may also state prompts of its own (``query_prompt`` / ``document_prompt`` in its
settings, read from a sentence-transformers folder's ``config_sentence_transformers.json``):
EmbeddingGemma reads ``task: search result | query: `` / ``title: none | text: ``. Such a
fixed prompt replaces the format's text for its role, and a query then takes no instruction:
the model was trained with that one prompt.
"""

from __future__ import annotations

PROMPT_FORMATS = ("e5", "plain", "prefix", "none")


def query_prefix(instruction: str | None, prompt_format: str = "e5", fixed: str | None = None
                 ) -> str:  # fmt: skip
    """The text put before a query (``fixed``: the model's own query prompt, if it states one)."""
    if fixed is not None:
        return fixed
    if prompt_format == "e5":
        return f"Instruct: {instruction}\nQuery: " if instruction else ""
    if prompt_format == "plain":
        return f"{instruction}\n" if instruction else ""
    if prompt_format == "prefix":
        return "query: "
    if prompt_format == "none":
        return ""
    raise ValueError(f"unknown prompt_format {prompt_format!r}; use one of {PROMPT_FORMATS}")


def document_prefix(prompt_format: str = "e5", fixed: str | None = None) -> str:
    """The text put before a document (none but in the ``prefix`` format, or the model's own)."""
    if fixed is not None:
        return fixed
    return "passage: " if prompt_format == "prefix" else ""


def format_query(query: str, instruction: str | None, prompt_format: str = "e5",
                 fixed: str | None = None) -> str:  # fmt: skip
    return query_prefix(instruction, prompt_format, fixed) + query


def format_passage(text: str, prompt_format: str = "e5", fixed: str | None = None) -> str:
    return document_prefix(prompt_format, fixed) + text
