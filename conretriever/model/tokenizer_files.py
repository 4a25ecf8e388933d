"""A saved folder's tokenizer, loaded without parsing its ``tokenizer.json`` in Python.

transformers 5 loads a folder's fast tokenizer in two steps that each read the whole
``tokenizer.json`` with Python's ``json`` (33 MB for Gemma-3's 262,144-token vocabulary and
514,906 merges: ~2 s a parse on 2 CPU cores) before the Rust library reads it a third time:

1. when ``tokenizer_config.json`` holds no ``added_tokens_decoder`` (transformers 5's own
   ``save_pretrained`` writes none), a legacy branch parses the file for its ``added_tokens``
   list alone;
2. a tokenizer class with its own ``__init__`` (``GemmaTokenizer``, ``LlamaTokenizer``, ...)
   gets the vocabulary and merges parsed out of the file and rebuilds its BPE from those Python
   objects, where a class without one has Rust read the file (``Tokenizer.from_file``).

:func:`load_tokenizer` hands transformers the same things faster: the ``added_tokens`` list
is the file's first array (the Rust library writes ``version``, ``truncation``, ``padding``,
then ``added_tokens``), decoded alone from the file's head; and the class is built as one
without its own ``__init__`` would be: its ``__init__`` makes the class's default pipeline,
then the backend read by Rust from the very file replaces it. The file was written from such an
object, so its normaliser, pre-tokeniser, model and decoder are that object's; the tests check
that both loads give the same ids, special tokens and saved files. A folder this does not
cover takes transformers' own load: above all any folder conretriever did not write (a hub
folder's ``tokenizer.json`` may hold another pipeline than its class builds, and transformers 5
builds the class's), and also one without ``tokenizer.json``, with legacy
``special_tokens_map.json`` or ``added_tokens.json``, or whose ``added_tokens`` list is not
where the Rust library puts it. conretriever writes a folder's tokenizer files with
transformers' own ``save_pretrained`` of the loaded tokenizer, and marks the folder: the GGUF
cache with ``conretriever_source.json``, an exported model with ``conretriever.json``.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

HEAD_BYTES = 8 << 20  # where to look for "added_tokens": Gemma-3's list is ~0.7 MB in
# the files that mark a folder whose tokenizer files conretriever wrote (see the module)
WRITTEN_HERE = ("conretriever.json", "conretriever_source.json")


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)``, the same tokenizer, without the Python parses of
    ``tokenizer.json`` (see the module)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    added = _added_tokens(folder)
    if added is None:
        return AutoTokenizer.from_pretrained(str(folder))
    with _rust_reads_tokenizer_json():
        return AutoTokenizer.from_pretrained(str(folder), added_tokens_decoder=added)


def _added_tokens(folder: Path) -> dict[int, dict] | None:
    """``{id: AddedToken fields}`` of the folder's ``tokenizer.json``, read from its head; None
    where the fast load does not apply (see the module)."""
    file = folder / "tokenizer.json"
    if not file.is_file() or not any((folder / mark).is_file() for mark in WRITTEN_HERE):
        return None
    if (folder / "special_tokens_map.json").exists() or (folder / "added_tokens.json").exists():
        return None
    config_file = folder / "tokenizer_config.json"
    try:
        config = (
            json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        )
        with open(file, "rb") as handle:
            head = handle.read(HEAD_BYTES).decode("utf-8", errors="ignore")
    except (OSError, ValueError):
        return None  # transformers' own load says what is wrong
    if not isinstance(config, dict) or "added_tokens_decoder" in config:
        return None
    key = head.find('"added_tokens":')
    # the key must sit at the top level, before the vocabulary: "model" comes after it
    if key < 0 or '"model":' in head[:key]:
        return None
    try:
        start = key + len('"added_tokens":')
        start += len(head[start : start + 64]) - len(head[start : start + 64].lstrip())
        tokens, _ = json.JSONDecoder().raw_decode(head, start)
    except ValueError:  # the list runs past the head: leave it to transformers
        return None
    if not isinstance(tokens, list) or not all(isinstance(t, dict) and "id" in t for t in tokens):
        return None
    return {int(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokens}


@contextmanager
def _rust_reads_tokenizer_json():
    """Within the block, every fast tokenizer class is loaded from a ``tokenizer.json`` as a
    class without its own ``__init__`` is: Rust reads the file (see the module)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers: its own load
        TokenizersBackend = None
    original = TokenizersBackend and TokenizersBackend.__dict__.get("convert_to_native_format")
    if not isinstance(original, classmethod):
        yield
        return

    def as_is(cls, trust_remote_code=False, **kwargs):
        file = kwargs.get("tokenizer_file")
        if file is not None and os.path.isfile(file):
            return dict(kwargs)
        return original.__func__(cls, trust_remote_code=trust_remote_code, **kwargs)

    TokenizersBackend.convert_to_native_format = classmethod(as_is)
    try:
        yield
    finally:
        TokenizersBackend.convert_to_native_format = original
