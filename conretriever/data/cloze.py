"""Inverse-cloze pairs: one sentence of a passage as the query, the passage as its positive.

The Inverse Cloze Task (ICT; Lee, Chang and Toutanova 2019, "Latent Retrieval for Weakly
Supervised Open Domain Question Answering") makes retrieval training pairs out of unlabelled
text: a sentence is drawn from a passage and must retrieve the rest of that passage. The query
is a declarative statement rather than a question (as the claims of SciFact, FEVER or ArguAna
are), and matching it means reading the passage's context, not only its words: the sentence is
cut out of the positive, except in a fraction ``keep_sentence`` of the rows (0.1, as in the
paper), so the model also learns that a verbatim copy is relevant.

``conretriever cloze --data <files or folders> --output <task>.jsonl`` reads passages from
training task files (every ``positive`` and ``negative``) or corpus files (``text``, with its
``title`` kept in front of the positive and never drawn as a query), keeps each distinct
passage once, and writes up to ``per_passage`` rows per passage in the training schema, each
carrying ``--instruction``. The rows have no negatives: mine them (``conretriever mine
--corpus self``). One row per passage is the default because two rows of the same passage
would have near-identical positives, and each would be a false in-batch negative for the other.

Sentences are split at ``.``, ``!`` or ``?`` followed by white space and an upper-case letter,
a digit or an opening quote or bracket; an abbreviation such as "U.S. Army" splits wrongly,
which costs one odd query, not a wrong pair. A sentence is drawn only if it has between
``min_words`` and ``max_words`` words, and only from passages of at least ``min_sentences``
sentences (so that the rest is context enough to find it from). The draw is seeded: the same
inputs and flags give the same file.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import ConfigError, DataError
from conretriever.files import (
    atomic_files,
    json_line,
    open_text,
    output_file,
    refuse_existing,
    writing,
)
from conretriever.options import opt, output_opt

DEFAULT_INSTRUCTION = "Given a sentence, retrieve the passage it was taken from"
# white space after an end mark (or an end mark and a closing quote or bracket), before a capital,
# a digit or an opening quote or bracket
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(\[])")


@dataclass
class ClozeSettings:
    """``conretriever cloze`` flags (and the Python API's settings)."""

    data: list[Path] = opt(
        default_factory=list, help="training task files, corpus.jsonl files, or folders of them"
    )
    output: Path | None = output_opt(None, required=True, help="the task file to write")
    overwrite: bool = opt(False, help="replace an existing --output")
    per_passage: int = opt(1, ge=1, help="rows per passage (each a different sentence)")
    keep_sentence: float = opt(
        0.1, ge=0, le=1, help="share of rows whose positive keeps the query sentence"
    )
    min_words: int = opt(6, ge=1, help="shortest sentence drawn, in words")
    max_words: int = opt(64, ge=1, help="longest sentence drawn, in words")
    min_sentences: int = opt(3, ge=2, help="passages with fewer sentences give no row")
    max_rows: int = opt(0, ge=0, help="stop after this many rows (0: every passage)")
    seed: int = opt(0)
    instruction: str = opt(DEFAULT_INSTRUCTION, help="the instruction every row carries")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("--data is required (training or corpus files, or folders)")
        if self.min_words > self.max_words:
            raise ConfigError(f"--min_words {self.min_words} is above --max_words {self.max_words}")
        if not self.instruction.strip():
            raise ConfigError("--instruction is empty")


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences (see the module docstring for the rule)."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def _input_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
            if not found:
                raise DataError(f"{path}: no .jsonl or .jsonl.gz files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: not found")
    return files


def _strings(value, where: str, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise DataError(f"{where}: field {name!r}: expected a string or a list of strings")
    return items


def read_passages(paths: list[Path]) -> list[tuple[str, str]]:
    """Every distinct passage of the files as (title, text), in the order first seen; the
    title is "" for training rows' passages."""
    seen: dict[tuple[str, str], None] = {}
    for path in _input_files(paths):
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                row = json_line(where, line)
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object")
                texts: list[tuple[str, str]] = []
                for name in ("positive", "negative"):
                    if name in row:
                        texts += [("", t) for t in _strings(row[name], where, name)]
                if "text" in row:
                    text = " ".join(_strings(row["text"], where, "text"))
                    title = " ".join(_strings(row.get("title") or "", where, "title"))
                    texts.append((title.strip(), text))
                if not texts and not ({"positive", "negative", "text"} & row.keys()):
                    raise DataError(
                        f"{where}: no 'positive', 'negative' or 'text' field to take passages from"
                    )
                seen.update(dict.fromkeys((title, t) for title, t in texts if t.strip()))
    return list(seen)


def cloze_rows(passages: list[tuple[str, str]], settings: ClozeSettings):
    """The training rows, one dict per row, drawn with ``settings.seed``. A title is never
    drawn as a query: it stays in front of the positive, as context."""
    rng = random.Random(settings.seed)
    written = 0
    for title, passage in passages:
        sentences = split_sentences(passage)
        if len(sentences) < settings.min_sentences:
            continue
        eligible = [
            i
            for i, s in enumerate(sentences)
            if settings.min_words <= len(s.split()) <= settings.max_words
        ]
        for i in rng.sample(eligible, min(settings.per_passage, len(eligible))):
            keep = rng.random() < settings.keep_sentence
            rest = sentences if keep else sentences[:i] + sentences[i + 1 :]
            yield {
                "query": sentences[i],
                "positive": [" ".join([title, *rest] if title else rest)],
                "negative": [],
                "instruction": settings.instruction,
            }
            written += 1
            if settings.max_rows and written >= settings.max_rows:
                return


def run(settings: ClozeSettings) -> int:
    """``conretriever cloze``."""
    import json

    out = output_file(settings.output, "--output")
    refuse_existing([out], settings.overwrite)
    passages = read_passages(settings.data)
    rows = list(cloze_rows(passages, settings))  # small: one short row per passage at most
    if not rows:
        raise DataError(
            f"no row written: none of the {len(passages)} passages has {settings.min_sentences} "
            f"sentences with one of {settings.min_words}-{settings.max_words} words"
        )
    with atomic_files() as stage, writing(out, "--output"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(stage(out), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"cloze: {len(rows)} rows from {len(passages)} distinct passages -> {out}")
    return 0
