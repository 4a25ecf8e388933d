"""Inverse-cloze pairs: one sentence of a passage as the query, the rest of it as the positive.

The Inverse Cloze Task (ICT; Lee, Chang and Toutanova 2019, "Latent Retrieval for Weakly
Supervised Open Domain Question Answering") makes retrieval training pairs out of unlabelled
text: a sentence is drawn from a passage and must retrieve the rest of that passage. The query
is a declarative statement rather than a question (as the claims of SciFact, FEVER or ArguAna
are), and matching it means reading the passage's context, not only its words: the sentence is
cut out of the positive, except in a fraction ``keep_sentence`` of the rows (0.1, as in the
paper), so the model also learns that a verbatim copy is relevant.

``conretriever cloze --data <files or folders> --output <task>.jsonl`` reads passages from
training task files (every ``positive`` and ``negative``) or corpus files (``text``, with its
``title`` kept in front of the positive and never drawn as a query; of a BEIR folder only its
corpus is read, never its queries), keeps each distinct (title, passage) once, and writes up
to ``per_passage`` rows per passage in the training schema, each carrying ``--instruction``.
The rows have no negatives: mine them (``conretriever mine --corpus self``). One row per
passage is the default because two rows of the same passage would have near-identical
positives, and each would be a false in-batch negative for the other.

Sentences are split at ``.``, ``!`` or ``?`` (and any closing quote or bracket) followed by
white space and an upper-case letter of any script, a digit, or an opening quote or bracket
(straight, curly or angle quotes); the positive is the kept sentences joined by single spaces
(line breaks inside a passage are not kept). An abbreviation such as "U.S. Army" splits wrongly,
which costs one odd query, not a wrong pair. A sentence is drawn only if it has between
``min_words`` and ``max_words`` words, and only from passages of at least ``min_sentences``
sentences (so that the rest is context enough to find it from). Each passage's draw is seeded
by ``--seed`` and the passage itself: the same inputs and flags give the same file, and adding,
removing or editing a passage leaves the other passages' rows as they were.
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
# white space after an end mark, or after an end mark and a closing quote or bracket: a sentence
# boundary when the next character opens a sentence (see split_sentences)
_CLOSERS = "\"')]\u201d\u2019\u00bb"
_OPENERS = "\"'([\u201c\u2018\u00ab"
_BOUNDARY = re.compile(rf"(?:(?<=[.!?])|(?<=[.!?][{re.escape(_CLOSERS)}]))\s+")


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
    """``text`` cut into sentences: at white space after ``.``, ``!`` or ``?`` (and any closing
    quote or bracket) when the next character is an upper-case letter of any script, a digit,
    or an opening quote or bracket."""
    text = text.strip()
    sentences, start = [], 0
    for gap in _BOUNDARY.finditer(text):
        nxt = text[gap.end() : gap.end() + 1]
        if nxt and (nxt.isupper() or nxt.isdigit() or nxt in _OPENERS):
            sentences.append(text[start : gap.start()])
            start = gap.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def _input_files(paths: list[Path], output: Path | None = None) -> list[Path]:
    """The files to read: each file named, and each folder's ``.jsonl[.gz]`` files; of a BEIR
    folder (one holding ``corpus.jsonl``) only the corpus, never its queries (evaluation data).
    ``output`` is left out, so a rerun into a data folder does not read its own last output."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            corpus = [path / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (path / n).is_file()]
            found = corpus or sorted(
                p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz"))
            )
            if not found:
                raise DataError(f"{path}: no .jsonl or .jsonl.gz files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: not found")
    skip = output.resolve() if output is not None else None
    return [f for f in files if f.resolve() != skip]


def _strings(value, where: str, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise DataError(f"{where}: field {name!r}: expected a string or a list of strings")
    for item in items:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows "\ud800"; UTF-8 output does not
            raise DataError(
                f"{where}: field {name!r}: holds a lone surrogate (\\ud800-\\udfff)"
            ) from None
    return items


def read_passages(paths: list[Path], output: Path | None = None) -> list[tuple[str, str]]:
    """Every distinct passage of the files as (title, text), in the order first seen; the
    title is "" for training rows' passages. A training row's fields are ``positive`` and
    ``negative``, a corpus row's ``text`` and ``title``: a row with both kinds is refused."""
    seen: dict[tuple[str, str], None] = {}
    files = _input_files(paths, output)
    for path in files:
        try:
            with open_text(path) as handle:
                for lineno, line in enumerate(handle, 1):
                    if line.strip():
                        _read_row(f"{path}:{lineno}", line, seen)
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read: {err}") from None
    if not seen:
        raise DataError(f"no passage in {', '.join(map(str, files))}")
    return list(seen)


def _read_row(where: str, line: str, seen: dict) -> None:
    row = json_line(where, line)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    training = [name for name in ("positive", "negative") if name in row]
    if training and "text" in row:
        raise DataError(
            f"{where}: fields {training[0]!r} and 'text': a training row and a corpus row at "
            "once; which is the passage?"
        )
    texts: list[tuple[str, str]] = []
    for name in training:
        texts += [("", t) for t in _strings(row[name], where, name)]
    if "text" in row:
        text = " ".join(_strings(row["text"], where, "text"))
        title = " ".join(_strings(row.get("title") or "", where, "title"))
        texts.append((title.strip(), text))
    elif not training:
        raise DataError(f"{where}: no 'positive', 'negative' or 'text' field to take passages from")
    seen.update(dict.fromkeys((title, t) for title, t in texts if t.strip()))


def cloze_rows(passages: list[tuple[str, str]], settings: ClozeSettings):
    """The training rows, one dict per row, drawn with ``settings.seed``. A title is never
    drawn as a query: it stays in front of the positive, as context."""
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
        # a draw of its own per passage (seeded by the seed and the passage's text): adding or
        # changing one passage, or the sentence rule on one, changes no other passage's rows
        rng = random.Random(f"{settings.seed}\n{title}\n{passage}")
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
    if out.name.endswith(".gz"):
        raise ConfigError(f"--output {out}: write a plain .jsonl (this command does not gzip)")
    refuse_existing([out], settings.overwrite)
    passages = read_passages(settings.data, out)
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
