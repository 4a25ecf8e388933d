"""BEIR: one retrieval dataset as a folder on disk, read into memory for evaluation.

A BEIR folder holds three files, each optionally gzipped (``.gz``):

* ``corpus.jsonl``: one document per line, ``{"_id", "title", "text"}`` (title optional);
* ``queries.jsonl``: one query per line, ``{"_id", "text"}``;
* ``qrels/<split>.tsv``: relevance judgements ``query-id<TAB>corpus-id<TAB>score`` (header
  optional; TREC's 4-column ``qid 0 docid grade`` is accepted too). Grades are integers; a grade
  >= 1 means relevant, larger is more relevant (nDCG uses the grade as the gain).

A folder with no ``corpus.jsonl`` whose subfolders are BEIR folders (CQADupStack's 12 subforums)
is read as one task with ``subsets``: the evaluation averages over them.

Documents become passage text here, title and text joined with a space
(``conretriever.tasks.format_document``), so every consumer encodes them the same way. The task
name is the MTEB name of the folder (``scifact`` -> ``SciFact``), which selects the instruction,
the split and the self-match rule below. A malformed line fails at once, named as ``file:line``
(``:field``), before any encoding starts.

Two per-dataset facts come from MTEB, so local folders are scored as MTEB scores them (a test
checks both against mteb's task classes): the split that is evaluated (``DEFAULT_SPLIT``, "test"
unless listed) and the tasks whose rankings drop a document with the query's own id
(``IGNORE_IDENTICAL_IDS``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from conretriever.tasks import BEIR_DIR_TO_TASK, format_document

# Tasks whose mteb 2.26 class sets ignore_identical_ids (a test checks this against mteb).
IGNORE_IDENTICAL_IDS = frozenset({"ArguAna", "FEVER", "FiQA2018", "MSMARCO", "QuoraRetrieval"})
# Tasks evaluated on another split than "test" (MS MARCO has public dev qrels only).
DEFAULT_SPLIT = {"MSMARCO": "dev"}


@dataclass
class BeirData:
    """One BEIR folder in memory. ``qrels``: query id -> {doc id: grade}."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]  # title + text, ready to encode as passages
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str = "test"
    source: str = ""
    subsets: list[BeirData] = field(default_factory=list)  # CQADupStack-style folder of folders


def task_name_for_dir(path: str | Path) -> str:
    """MTEB name for a BEIR folder name (``scifact`` -> ``SciFact``), else the folder name."""
    name = Path(path).name
    return BEIR_DIR_TO_TASK.get(name.lower(), name)


# ----- reading BEIR folders -----------------------------------------------------------------------
def _find(folder: Path, relative: str) -> Path:
    for candidate in (folder / relative, folder / f"{relative}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder}: missing {relative} (or {relative}.gz)")


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        yield from enumerate(handle, 1)


def _read_jsonl(path: Path, need_title: bool) -> list[tuple[str, str, str]]:
    """(id, title, text) rows; a bad line is reported as ``file:line`` (``:field``)."""
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {err}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        for key in ("_id", "text"):
            if key not in obj or obj[key] is None:
                raise ValueError(f"{path}:{lineno}:{key}: missing required field {key!r}")
        title = obj.get("title") or "" if need_title else ""
        rows.append((str(obj["_id"]), str(title), str(obj["text"])))
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels: ``query-id<TAB>corpus-id<TAB>score`` (header optional); TREC's 4-column
    ``qid 0 docid grade`` is accepted too."""
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in _lines(path):
        parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
        if not parts or parts == [""]:
            continue
        if lineno == 1 and parts[0].lower() in ("query-id", "query_id", "qid"):
            continue
        if len(parts) == 4:
            parts = [parts[0], parts[2], parts[3]]
        try:
            if len(parts) != 3:
                raise ValueError
            qid, docid, grade = parts[0].strip(), parts[1].strip(), int(float(parts[2]))
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: malformed qrels line {line.rstrip()!r}; "
                "expected query-id<TAB>corpus-id<TAB>integer score"
            ) from None
        qrels.setdefault(qid, {})[docid] = grade
    return qrels


def load_beir_dir(path: str | Path, split: str | None = None) -> BeirData:
    """Read a BEIR folder, or a folder whose subfolders are BEIR folders (CQADupStack)."""
    folder = Path(path)
    name = task_name_for_dir(folder)
    split = split or DEFAULT_SPLIT.get(name, "test")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    has_corpus = any((folder / f).exists() for f in ("corpus.jsonl", "corpus.jsonl.gz"))
    if not has_corpus:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("corpus.jsonl*")))
        if not subs:
            raise FileNotFoundError(f"{folder}: no corpus.jsonl here or in any subfolder")
        subsets = [load_beir_dir(p, split) for p in subs]
        return BeirData(name, [], [], {}, {}, split, str(folder), subsets)
    corpus = _read_jsonl(_find(folder, "corpus.jsonl"), need_title=True)
    queries = {qid: text for qid, _, text in _read_jsonl(_find(folder, "queries.jsonl"), False)}
    qrels = _read_qrels(_find(folder, f"qrels/{split}.tsv"))
    return BeirData(
        name,
        [doc_id for doc_id, _, _ in corpus],
        [format_document(text, title or None) for _, title, text in corpus],
        queries,
        qrels,
        split,
        str(folder),
    )
