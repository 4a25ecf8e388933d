"""Dataset conversion: Hugging Face / BEIR / MS MARCO-style data -> training task JSONL.

The trainer reads one ``<task>.jsonl`` per task, each line ``{"query", "positive": [..],
"negative": [..], "instruction"?}`` (see ``conretriever.data.training``). This module turns the
layouts people actually have into that file. ``conretriever.data.sources`` finds the inputs (hub
dataset, local file, collection folder, BEIR folder) and streams their records; here each record
becomes a row in the training schema, which is validated and written as it arrives, so nothing is
held in memory whole:

* ``columns`` (the E5-R collection ``BeastyZ/E5-R``, FlagEmbedding, sentence-transformers and
  Tevatron files): one row per query with query / positive / negative (/ instruction) columns.
  Column names come from ``--query-column`` etc., or the first of the usual aliases present
  (``query|question|anchor|claim``, ``positive|positives|pos|positive_passages|...``). A cell may be
  a string, a list of strings, or Tevatron-style ``{"title", "text"}`` dicts (joined by a space).
* ``triples``: a header-less TSV of ``query<TAB>positive[<TAB>negative]`` (MS MARCO
  ``triples.train.small.tsv``). MS MARCO repeats a query once per negative, so consecutive lines
  with the same query and positive are merged into one row with all their negatives.
* ``beir``: a folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``, read by
  ``beir.judged_queries``: positives are the documents with grade >= 1 (title and text joined by a
  space); negatives are left empty for ``conretriever mine``.

A local folder that is not BEIR is a collection: each sub-folder (or file stem) is a config, the
way ``BeastyZ/E5-R`` is organised on the hub; ``--config all`` converts every config into its
own task file. Every output row passes the trainer's own validator (``data.parse_row``); a bad
input row is reported as ``file:row: field 'x': problem``, where ``row`` is the 1-based record
number in that file (for JSONL without blank lines, the line number). Output goes to hidden
temporary files that are renamed into place only when every requested task converted cleanly, so
a failed run leaves no half-written task file behind.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from conretriever.data.beir import document_text, judged_queries
from conretriever.data.sources import (
    Source,
    buffer_shuffle,
    first_line,
    iter_file,
    iter_hub,
    resolve_sources,
)
from conretriever.data.tasks import BEIR_DIR_TO_TASK, TaskRegistry, eval_instruction
from conretriever.data.training import MAX_REPORTED_ERRORS, parse_row
from conretriever.errors import ConfigError, DataError
from conretriever.files import atomic_files, output_folder, refuse_existing, writing
from conretriever.options import opt, output_opt
from conretriever.progress import Progress

# First alias present in a row wins; the order puts the most specific names first.
QUERY_ALIASES = ("query", "question", "anchor", "claim")
POSITIVE_ALIASES = ("positive", "positives", "pos", "positive_passages", "document", "passage")
NEGATIVE_ALIASES = ("negative", "negatives", "neg", "negative_passages", "hard_negatives")
INSTRUCTION_ALIASES = ("instruction", "prompt")


@dataclass
class ConvertSettings:
    """``conretriever convert`` / ``hf_to_training_data.py`` flags. With neither ``--dataset``
    nor ``--output`` (no arguments at all), the embedded example dataset is converted."""

    dataset: str | None = opt(
        None, help="hub name, local file, local collection folder or BEIR folder"
    )
    output: Path | None = output_opt(
        None, help="output folder; each task becomes <output>/<task>.jsonl"
    )
    overwrite: bool = opt(False, help="replace task files that already exist in --output")
    config: str | None = opt(
        None, help="a config (hub) / sub-folder or file stem (local); all: every one"
    )
    split: str = opt("train", help="hub split; BEIR: qrels/<split>.tsv; local file-name prefix")
    layout: Literal["auto", "columns", "triples", "beir"] = opt(
        "auto", help="how rows are laid out (see the module docstring)"
    )
    task: str | None = opt(None, help="output task name (none: config, else folder/file stem)")
    query_column: str | None = opt(None, help="none: the first of the usual aliases present")
    positive_column: str | None = opt(None)
    negative_column: str | None = opt(None)
    instruction_column: str | None = opt(None)
    instruction: str | None = opt(None, help="put on rows that carry none")
    max_examples: int | None = opt(None, ge=1, help="output rows per task (after shuffling)")
    max_negatives: int | None = opt(None, ge=0, help="a seeded random subset of each row's")
    shuffle_buffer: int = opt(0, ge=0, help="> 0: streaming shuffle with a buffer of N rows")
    seed: int = opt(42, help="for the shuffle and the negative subsets")
    progress: bool = opt(True)

    def validate(self) -> None:
        if (self.dataset is None) != (self.output is None):
            raise ConfigError(
                "--dataset and --output are both needed (or no arguments: the embedded example)"
            )


@dataclass
class TaskReport:
    task: str
    path: str
    rows_read: int = 0
    rows_written: int = 0
    positives: int = 0
    negatives: int = 0
    with_instruction: int = 0


# --- turning records into rows ------------------------------------------------------------------


def _texts(value):
    """A cell -> list of passage strings. Strings, lists and Tevatron ``{title, text}`` dicts are
    understood; anything else is passed through unchanged for the validator to name."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and "text" in value:
        return [document_text(value.get("title"), value["text"])]
    if isinstance(value, list):
        out = []
        for item in value:
            converted = _texts(item)
            if not isinstance(converted, list):
                return value
            out += converted
        return out
    return value


@dataclass
class Columns:
    query: str
    positive: str
    negative: str | None
    instruction: str | None

    @classmethod
    def resolve(cls, settings: ConvertSettings, record: dict, where: str) -> Columns:
        """Columns from the flags, else the first alias present in the first record."""
        keys = list(record)

        def pick(flag: str | None, aliases: tuple[str, ...], what: str, required: bool):
            if flag is not None:
                if flag not in record:
                    raise DataError(f"{where}: no column {flag!r} ({what}); columns: {keys}")
                return flag
            found = next((a for a in aliases if a in record), None)
            if found is None and required:
                raise DataError(
                    f"{where}: no {what} column (looked for {', '.join(aliases)}); columns: "
                    f"{keys}; name it with --{what}-column"
                )
            return found

        return cls(
            query=pick(settings.query_column, QUERY_ALIASES, "query", True),
            positive=pick(settings.positive_column, POSITIVE_ALIASES, "positive", True),
            negative=pick(settings.negative_column, NEGATIVE_ALIASES, "negative", False),
            instruction=pick(
                settings.instruction_column, INSTRUCTION_ALIASES, "instruction", False
            ),
        )


def column_rows(
    records: Iterable[tuple[str, dict]], settings: ConvertSettings, merge_consecutive: bool
) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` -> ``(where, row)`` in the training schema (not yet validated)."""
    columns: Columns | None = None
    pending: tuple[str, dict] | None = None
    for where, record in records:
        if columns is None:
            columns = Columns.resolve(settings, record, where)
        row = {
            "query": record.get(columns.query),
            "positive": _texts(record.get(columns.positive)),
            "negative": _texts(record.get(columns.negative)) if columns.negative else [],
        }
        if columns.instruction and record.get(columns.instruction) is not None:
            row["instruction"] = record[columns.instruction]
        if not merge_consecutive:
            yield where, row
            continue
        prev = pending[1] if pending else None
        if (
            prev is not None
            and prev["query"] == row["query"]
            and prev["positive"] == row["positive"]
            and isinstance(prev["negative"], list)
            and isinstance(row["negative"], list)
        ):
            prev["negative"] += [n for n in row["negative"] if n not in prev["negative"]]
            continue
        if pending:
            yield pending
        pending = (where, row)
    if pending:
        yield pending


# --- layouts ------------------------------------------------------------------------------------


def _layout_of(source: Source, settings: ConvertSettings) -> str:
    if source.beir_dir is not None:
        return "beir"
    if settings.layout != "auto":
        return settings.layout
    # A .tsv whose first line names none of the known columns is MS MARCO-style triples.
    if source.files and source.files[0].name.endswith(".tsv"):
        header = set(first_line(source.files[0]).split("\t"))
        flags = {settings.query_column, settings.positive_column}
        if not header & (set(QUERY_ALIASES) | set(POSITIVE_ALIASES) | flags):
            return "triples"
    return "columns"


def source_rows(source: Source, settings: ConvertSettings) -> Iterator[tuple[str, dict]]:
    layout = _layout_of(source, settings)
    if layout == "beir":
        return judged_queries(source.beir_dir, settings.split)
    if source.hub is not None:
        records = iter_hub(source.hub[0], source.hub[1], settings.split)
    else:
        records = (item for path in source.files for item in iter_file(path, layout))
    return column_rows(records, settings, merge_consecutive=layout == "triples")


# --- writing ------------------------------------------------------------------------------------


def convert_source(
    source: Source, settings: ConvertSettings, handle, registry: TaskRegistry
) -> TaskReport:
    """Validate and write one task's rows to an open file; raise DataError on bad rows."""
    report = TaskReport(task=source.task, path=str(settings.output / f"{source.task}.jsonl"))
    default_instruction = settings.instruction
    if default_instruction is None and registry.instruction(source.task) is None:
        beir_name = Path(source.label).name.lower()
        if source.beir_dir is not None and beir_name in BEIR_DIR_TO_TASK:
            default_instruction = eval_instruction(beir_name)
    rows = source_rows(source, settings)
    if settings.shuffle_buffer > 0:
        rows = buffer_shuffle(rows, settings.shuffle_buffer, settings.seed)
    errors: list[str] = []
    bar = Progress(None, f"convert {source.task}", unit="rows", enabled=settings.progress)
    with bar:
        for where, row in rows:
            report.rows_read += 1
            bar.update(1)
            ex = parse_row(row, where, source.task, errors)
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            if ex is None:
                continue
            negatives = list(ex.negatives)
            if settings.max_negatives is not None and len(negatives) > settings.max_negatives:
                rng = random.Random(f"{settings.seed}:{where}")
                negatives = rng.sample(negatives, settings.max_negatives)
            out = {"query": ex.query, "positive": list(ex.positives), "negative": negatives}
            instruction = ex.instruction or default_instruction
            if instruction:
                out["instruction"] = instruction
                report.with_instruction += 1
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            report.rows_written += 1
            report.positives += len(ex.positives)
            report.negatives += len(negatives)
            bar.set_postfix(written=report.rows_written)
            if settings.max_examples is not None and report.rows_written >= settings.max_examples:
                break
    if errors:
        more = " (stopped after the first 20)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        raise DataError(f"{len(errors)} problem(s) in {source.label}{more}:\n" + "\n".join(errors))
    if report.rows_written == 0:
        raise DataError(f"{source.label}: no rows")
    return report


def convert(settings: ConvertSettings, registry: TaskRegistry | None = None) -> list[TaskReport]:
    """Convert every source; all task files appear together, or none does."""
    registry = registry or TaskRegistry.load()
    output_folder(settings.output, "--output")  # a file there, read-only: before reading anything
    sources = resolve_sources(settings)
    names = [s.task for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"two sources map to the same task name: {names}")
    refuse_existing(
        [settings.output / f"{n}.jsonl" for n in names], settings.overwrite, "task file"
    )
    reports = []
    # A full disk half-way: the staged files go, the task files already there stay as they were.
    with writing(settings.output, "--output"), atomic_files() as stage:
        settings.output.mkdir(parents=True, exist_ok=True)
        for source in sources:
            tmp = stage(settings.output / f"{source.task}.jsonl")
            with open(tmp, "w", encoding="utf-8") as handle:
                reports.append(convert_source(source, settings, handle, registry))
    return reports


# --- command line -------------------------------------------------------------------------------


# The embedded default (no arguments): a small local dataset in the hub layout, shipped with the
# package, written where run outputs go.
SAMPLE_DATASET = Path(__file__).resolve().parent / "sample_data" / "hf_demo"
SAMPLE_OUT = Path("outputs") / "hf_demo_converted"


def run(settings: ConvertSettings) -> int:
    """``conretriever convert``: every task file written together, or none."""
    if settings.dataset is None:  # the embedded default: offline, seconds on a CPU
        print(f"no arguments: converting the embedded example dataset {SAMPLE_DATASET}")
        print(f"  (--dataset {SAMPLE_DATASET} --config all --output {SAMPLE_OUT}; --help for more)")
        settings = dataclasses.replace(
            settings, dataset=str(SAMPLE_DATASET), config="all", output=SAMPLE_OUT, overwrite=True
        )
    registry = TaskRegistry.load()
    reports = convert(settings, registry)
    for r in reports:
        print(
            f"{r.path}: {r.rows_written} rows (read {r.rows_read}), {r.positives} positives, "
            f"{r.negatives} negatives, {r.with_instruction} with instruction"
        )
        if r.with_instruction < r.rows_written and registry.instruction(r.task) is None:
            print(
                f"  note: task {r.task!r} has no registry instruction and some rows carry none; "
                "the trainer needs --instruction here or a --task_config entry",
                file=sys.stderr,
            )
    return 0
