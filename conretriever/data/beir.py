"""BEIR: one retrieval dataset as a folder on disk; the one reader every command uses.

A BEIR folder holds three files, each optionally gzipped (``.gz``):

* ``corpus.jsonl``: one document per line, ``{"_id", "title", "text"}`` (title optional);
* ``queries.jsonl``: one query per line, ``{"_id", "text"}``;
* ``qrels/<split>.tsv``: relevance judgements ``query-id<TAB>corpus-id<TAB>score`` (header
  optional; TREC's 4-column ``qid 0 docid grade`` is accepted too). Grades are integers; a grade
  >= 1 means relevant, larger is more relevant (nDCG uses the grade as the gain).

A folder with no ``corpus.jsonl`` whose subfolders are BEIR folders (CQADupStack's 12 subforums)
is read as one task with ``subsets``: the evaluation averages over them.

Evaluation (:func:`load_beir_dir`), conversion and decontamination (:func:`judged_queries`) and
mining (:func:`iter_corpus`) all read through here, so they agree on every rule:

* a document's text is its title and text joined by a space (:func:`document_text`), the way
  e5 encoded BEIR, so a positive converted from a folder is recognised in its corpus exactly;
* a malformed line, an empty corpus or query file, an id given twice with different texts (the
  same text twice is tolerated), or a judged query with no text is an error naming the file and
  line, raised before any encoding starts;
* judgements naming documents the corpus lacks are dropped with one warning giving the count
  (BEIR's ArguAna genuinely has 5).

The task name is the MTEB name of the folder (``scifact`` -> ``SciFact``), which selects the
instruction, the split and the self-match rule. Two per-dataset facts come from MTEB, so local
folders are scored as MTEB scores them (a test checks both against mteb's task classes): the
split that is evaluated (``DEFAULT_SPLIT``, "test" unless listed) and the tasks whose rankings
drop a document with the query's own id (``IGNORE_IDENTICAL_IDS``).
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conretriever.data.tasks import BEIR_DIR_TO_TASK
from conretriever.errors import DataError
from conretriever.files import json_line

log = logging.getLogger("conretriever.beir")

# Tasks whose mteb 2.26 class sets ignore_identical_ids (a test checks this against mteb).
IGNORE_IDENTICAL_IDS = frozenset({"ArguAna", "FEVER", "FiQA2018", "MSMARCO", "QuoraRetrieval"})
# Tasks evaluated on another split than "test" (MS MARCO has public dev qrels only).
DEFAULT_SPLIT = {"MSMARCO": "dev"}


def document_text(title: str | None, text: str | None) -> str:
    """A document as one passage: title and text joined by a space, outer whitespace removed."""
    return f"{title or ''} {text or ''}".strip()


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


def default_split(folder: str | Path) -> str:
    return DEFAULT_SPLIT.get(task_name_for_dir(folder), "test")


# ----- files ------------------------------------------------------------------------------------
def find_file(folder: Path, relative: str) -> Path:
    """``folder/relative`` or its ``.gz``; a clear error when neither exists."""
    for candidate in (folder / relative, folder / f"{relative}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{folder}: missing {relative} (or {relative}.gz)")


def is_beir_dir(folder: Path) -> bool:
    return folder.is_dir() and all(
        any((folder / f"{name}{gz}").exists() for gz in ("", ".gz"))
        for name in ("corpus.jsonl", "queries.jsonl")
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            yield from enumerate(handle, 1)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None


def _records(path: Path, need_text: bool = True) -> Iterator[tuple[str, str, str, str]]:
    """(where, id, title, text) per non-blank line of a corpus/queries JSONL file."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        obj = json_line(where, line)
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        doc_id = obj.get("_id")
        if doc_id is None or str(doc_id) == "":
            raise DataError(f"{where}: field '_id': missing")
        text = obj.get("text")
        if text is None or not isinstance(text, str):
            raise DataError(f"{where}: field 'text': missing or not a string")
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{where}: field 'title': expected a string")
        yield where, str(doc_id), title or "", text


def _unique(items: Iterator[tuple[str, str, str]], path: Path, what: str) -> dict[str, str]:
    """id -> text from (where, id, text) triples: an id twice with different texts is an error
    (which one would be meant?); the same text twice is harmless and kept once."""
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    for where, key, text in items:
        if key in out:
            if out[key] != text:
                raise DataError(
                    f"{where}: field '_id': {what} {key!r} appears twice with different texts "
                    f"(first at {first[key]})"
                )
            continue
        out[key] = text
        first[key] = where
    if not out:
        raise DataError(f"{path}: no {what}s (the file is empty)")
    return out


def iter_corpus(path: Path) -> Iterator[tuple[str, str, str]]:
    """(where, doc id, passage text) of a ``corpus.jsonl[.gz]``, title joined to the text."""
    for where, doc_id, title, text in _records(path):
        yield where, doc_id, document_text(title, text)


def read_corpus(path: Path) -> dict[str, str]:
    """doc id -> passage text, in file order (strict: see the module docstring)."""
    return _unique(iter_corpus(path), path, "document")


def read_queries(path: Path) -> dict[str, str]:
    """query id -> text, in file order (strict: see the module docstring)."""
    return _unique(((w, q, t) for w, q, _, t in _records(path)), path, "query")


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels (header optional) or TREC's 4-column ``qid 0 docid grade``; integer grades."""
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
            if not qid or not docid:
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}:{lineno}: malformed qrels line {line.rstrip()!r}; "
                "expected query-id<TAB>corpus-id<TAB>integer score"
            ) from None
        qrels.setdefault(qid, {})[docid] = grade
    if not qrels:
        raise DataError(f"{path}: no judgements (the file is empty)")
    return qrels


def _checked_qrels(qrels, queries, corpus_ids, qrels_path: Path, queries_path: Path):
    """Judged queries must have text (error); judgements of unknown documents are dropped with
    one warning giving the count."""
    missing_queries = [q for q, docs in qrels.items() if q not in queries and docs]
    if missing_queries:
        raise DataError(
            f"{qrels_path}: {len(missing_queries)} judged query id(s) have no text in "
            f"{queries_path.name}, e.g. {missing_queries[:5]}"
        )
    unknown = [(q, d) for q, docs in qrels.items() for d in docs if d not in corpus_ids]
    if unknown:
        log.warning(
            "%s: %d judgement(s) name documents missing from the corpus (dropped), e.g. %s",
            qrels_path,
            len(unknown),
            unknown[:3],
        )
        for q, d in unknown:
            del qrels[q][d]
    return qrels


# ----- whole folders ----------------------------------------------------------------------------
def load_beir_dir(path: str | Path, split: str | None = None) -> BeirData:
    """Read a BEIR folder, or a folder whose subfolders are BEIR folders (CQADupStack)."""
    folder = Path(path)
    name = task_name_for_dir(folder)
    split = split or DEFAULT_SPLIT.get(name, "test")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    has_corpus = any((folder / f).exists() for f in ("corpus.jsonl", "corpus.jsonl.gz"))
    if not has_corpus:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("corpus.jsonl*")))
        if not subs:
            raise DataError(f"{folder}: no corpus.jsonl here or in any subfolder")
        subsets = [load_beir_dir(p, split) for p in subs]
        return BeirData(name, [], [], {}, {}, split, str(folder), subsets)
    corpus_path = find_file(folder, "corpus.jsonl")
    queries_path = find_file(folder, "queries.jsonl")
    qrels_path = find_file(folder, f"qrels/{split}.tsv")
    corpus = read_corpus(corpus_path)
    queries = read_queries(queries_path)
    qrels = _checked_qrels(read_qrels(qrels_path), queries, corpus, qrels_path, queries_path)
    return BeirData(name, list(corpus), list(corpus.values()), queries, qrels, split, str(folder))


def judged_queries(folder: Path, split: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` per judged query of a BEIR folder, in ``queries.jsonl`` order:
    ``{"query", "positive": [relevant documents' texts], "negative": []}``, with ``where``
    naming the query's line. Only the relevant documents' texts are held in memory (a corpus
    of millions streams by); a query whose relevant documents are all missing is dropped
    (counted in the warning)."""
    queries_path = find_file(folder, "queries.jsonl")
    qrels_path = find_file(folder, f"qrels/{split}.tsv")
    corpus_path = find_file(folder, "corpus.jsonl")
    qrels = read_qrels(qrels_path)
    relevant = {q: [d for d, g in docs.items() if g >= 1] for q, docs in qrels.items()}
    needed = {d for docs in relevant.values() for d in docs}
    texts: dict[str, str] = {}
    seen_docs = 0
    for where, doc_id, text in iter_corpus(corpus_path):
        seen_docs += 1
        if doc_id in needed:
            if doc_id in texts and texts[doc_id] != text:
                raise DataError(
                    f"{where}: field '_id': document {doc_id!r} appears twice with different texts"
                )
            texts[doc_id] = text
    if not seen_docs:
        raise DataError(f"{corpus_path}: no documents (the file is empty)")
    missing = sorted(d for d in needed if d not in texts)
    if missing:
        log.warning(
            "%s: %d relevant document(s) missing from the corpus (dropped), e.g. %s",
            qrels_path,
            len(missing),
            missing[:3],
        )
    seen: dict[str, str] = {}
    for where, qid, _, text in _records(queries_path):
        if qid in seen:
            if seen[qid] != text:
                raise DataError(
                    f"{where}: field '_id': query {qid!r} appears twice with different texts"
                )
            continue
        seen[qid] = text
        positives = [texts[d] for d in relevant.get(qid, []) if d in texts]
        if positives:
            yield where, {"query": text, "positive": positives, "negative": []}
    if not seen:
        raise DataError(f"{queries_path}: no queries (the file is empty)")
    lacking = [q for q, docs in relevant.items() if docs and q not in seen]
    if lacking:
        raise DataError(
            f"{qrels_path}: {len(lacking)} judged query id(s) have no text in "
            f"{queries_path.name}, e.g. {lacking[:5]}"
        )
