"""Synthetic data, step 2: one JSON example per request (``conretriever generate``), and the
conversion of the examples to training JSONL (``conretriever convert-synthetic``).

Step 2 reads ``tasks.jsonl`` from step 1 and sends ``--examples-per-task`` requests per task.
Request ``j`` of a task has the id ``{family}:{task key}:{j}:seed{seed}``; its attributes (query
type and length, clarity, difficulty, document length, language, unit, scores) are drawn from a
``random.Random`` seeded by that id, so the same command always asks the same questions and a
killed run resumes exactly (see ``run.py`` and ``store.py``).

A reply is kept only when it parses to a JSON object whose three fields (see ``prompts.FIELDS``)
are non-empty strings, the positive differs from the negative, and (for retrieval families) the
query is not a copy of the positive. Anything else goes to ``examples.rejects.jsonl``.

Conversion (run automatically at the end of ``generate``) turns ``examples.jsonl`` into
``{train_dir}/synthetic.jsonl``, one training row per distinct query::

    {"query": str, "positive": [str], "negative": [str], "instruction": task description}

Rows are sorted by request id (family, task, index), so the file does not depend on the order in
which concurrent requests finished, and duplicate queries (normalised text) keep their first row.
``train_dir`` holds only ``synthetic.jsonl`` because the trainer reads every ``*.jsonl`` in a task
folder as a task; the file stem ``synthetic`` is the task name.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import ConfigError
from conretriever.files import output_folder
from conretriever.options import opt, output_opt
from conretriever.synth import prompts
from conretriever.synth.batch import BatchSettings, batch_extra, send_requests
from conretriever.synth.client import (
    ClientSettings,
    LLMClient,
    RequestFailed,
)
from conretriever.synth.parsing import ReplyParseError, extract_json
from conretriever.synth.run import Outcome, ResumableRun, configure_logging
from conretriever.synth.store import (
    StoreError,
    dedup_key,
    read_jsonl,
    request_seed,
    text_hash,
    write_jsonl_atomic,
)

log = logging.getLogger(__name__)
TRAIN_FILE = "synthetic.jsonl"  # task name = file stem = "synthetic" (tasks.py registers it)


@dataclass
class GenerateJob:
    out_dir: Path
    tasks_file: Path | None = None  # None = {out_dir}/tasks.jsonl
    train_dir: Path | None = None  # None = {out_dir}/train
    families: tuple[str, ...] = prompts.FAMILIES
    examples_per_task: int = 1
    languages: dict[str, float] | None = None  # None = prompts.DEFAULT_LANGUAGES
    seed: int = 0
    retry_rejects: bool = False


def load_tasks(path: Path, families: tuple[str, ...]) -> list[prompts.Task]:
    """Step-1 output, validated line by line (errors name file, line and field)."""
    if not path.exists():
        raise StoreError(f"{path}: no task file; run `conretriever brainstorm` first")
    tasks = []
    for lineno, row in enumerate(read_jsonl(path, allow_partial_tail=False), start=1):
        where = f"{path}:{lineno}"
        family, text = row.get("family"), row.get("task")
        if family not in prompts.FAMILIES:
            raise StoreError(f"{where}: field 'family' is {family!r}, not one of the families")
        if not isinstance(text, str) or not text.strip():
            raise StoreError(f"{where}: field 'task' must be a non-empty string")
        src, tgt = row.get("source_language", ""), row.get("target_language", "")
        if family == "bitext" and not (src and tgt):
            raise StoreError(f"{where}: bitext task needs 'source_language' and 'target_language'")
        if family in families:
            tasks.append(prompts.Task(family, text.strip(), src, tgt))
    return tasks


def plan_requests(tasks: list[prompts.Task], s: GenerateJob) -> list[dict]:
    languages = s.languages or prompts.DEFAULT_LANGUAGES
    jobs = []
    for task in tasks:
        key = text_hash(task.text)
        for j in range(s.examples_per_task):
            rid = f"{task.family}:{key}:{j}:seed{s.seed}"
            attrs = prompts.sample_attributes(task, random.Random(rid), languages)
            jobs.append({"id": rid, "task": task, "key": key, "index": j, "attributes": attrs})
    return jobs


def validate_example(family: str, reply: object) -> dict[str, str]:
    """The three fields of a step-2 reply, stripped; ReplyParseError names what is wrong."""
    if not isinstance(reply, dict):
        raise ReplyParseError(f"expected a JSON object, got {type(reply).__name__}")
    fields = prompts.FIELDS[family]
    out = {}
    for name in fields:
        value = reply.get(name)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
            raise ReplyParseError(f"field {name!r}: expected a non-empty string, got {got}")
        out[name] = value.strip()
    query, pos, neg = (dedup_key(out[n]) for n in fields)
    if pos == neg:
        raise ReplyParseError(f"fields {fields[1]!r} and {fields[2]!r} are identical")
    if query == pos and family not in ("long-short",):
        raise ReplyParseError(f"field {fields[1]!r} repeats {fields[0]!r}")
    return out


def answer(client: LLMClient, job: dict) -> Outcome:
    task: prompts.Task = job["task"]
    meta = {
        "id": job["id"],
        "family": task.family,
        "task": task.text,
        "task_key": job["key"],
        "index": job["index"],
        "attributes": job["attributes"],
    }
    if task.family == "bitext":
        meta.update(source_language=task.source_language, target_language=task.target_language)
    try:
        messages = prompts.generate_messages(task, job["attributes"])
        schema = prompts.reply_schema(task.family)
        done = client.chat(messages, seed=request_seed(job["id"]), schema=schema)
    except RequestFailed as exc:
        return Outcome.failed(meta, str(exc))
    try:
        example = validate_example(task.family, extract_json(done.text))
    except ReplyParseError as exc:
        return Outcome.rejected(meta, str(exc), done)
    return Outcome.accepted({**meta, "example": example}, done)


def to_training_rows(records: list[dict]) -> tuple[list[dict], int]:
    """Training rows from example records, in id order, one per distinct query; (rows, dups)."""
    order = {f: i for i, f in enumerate(prompts.FAMILIES)}
    records = sorted(
        records, key=lambda r: (order[r["family"]], r["task_key"], r["index"], r["id"])
    )
    rows, seen, dups = [], set(), 0
    for rec in records:
        q, pos, neg = (rec["example"][f] for f in prompts.FIELDS[rec["family"]])
        key = dedup_key(q)
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        rows.append({"query": q, "positive": [pos], "negative": [neg], "instruction": rec["task"]})
    return rows, dups


def write_training_file(examples_path: Path, train_dir: Path) -> dict:
    records = read_jsonl(examples_path)
    for rec in records:
        family, example = rec.get("family"), rec.get("example")
        if family not in prompts.FIELDS or not isinstance(example, dict):
            raise StoreError(f"{examples_path}: record {rec.get('id')!r} lacks family/example")
    rows, dups = to_training_rows(records)
    out = train_dir / TRAIN_FILE
    write_jsonl_atomic(out, rows)
    log.info("[convert] %d examples -> %d training rows (%d duplicate queries dropped) in %s",
             len(records), len(rows), dups, out)  # fmt: skip
    return {"examples": len(records), "rows": len(rows), "duplicates": dups, "path": str(out)}


def parse_languages(spec: str) -> dict[str, float] | None:
    """``"English:50,French:5,German"`` -> weights (a bare name weighs 1); "" -> default table."""
    if not spec.strip():
        return None
    table = {}
    for item in spec.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            table[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--languages: bad weight in {item!r}") from None
    if not all(table) or any(w <= 0 for w in table.values()):
        raise ValueError(f"--languages {spec!r}: names must be non-empty, weights > 0")
    return table


@dataclass
class GenerateSettings:
    """``conretriever generate`` flags."""

    output: Path = output_opt(Path("synthetic_out"), help="run folder: logs, tasks.jsonl, examples")
    tasks: Path | None = opt(None, help="task file (none: OUT_DIR/tasks.jsonl)")
    train_dir: Path | None = opt(None, help="gets synthetic.jsonl (none: OUT_DIR/train)")
    families: list[str] = opt(
        default_factory=lambda: ["all"],
        choices=("all", *prompts.FAMILIES),
        help="task families (comma or space separated)",
    )
    examples_per_task: int = opt(1, ge=1, help="requests (examples) per task")
    languages: str = opt("", help='e.g. "English:50,French:5" (none: the default table)')
    seed: int = opt(0)
    retry_rejects: bool = opt(False, help="re-ask requests whose replies were rejected")
    convert: bool = opt(True, help="write the training file synthetic.jsonl at the end")
    verbose: bool = opt(False, aliases=("v",), help="log every retry")
    client: ClientSettings = opt(default_factory=ClientSettings)
    batch: BatchSettings = opt(default_factory=BatchSettings)

    def settings(self) -> GenerateJob:
        try:
            languages = parse_languages(self.languages)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return GenerateJob(
            out_dir=self.output,
            tasks_file=self.tasks,
            train_dir=self.train_dir,
            families=prompts.FAMILIES if "all" in self.families else tuple(self.families),
            examples_per_task=self.examples_per_task,
            languages=languages,
            seed=self.seed,
            retry_rejects=self.retry_rejects,
        )


def run(command: GenerateSettings) -> int:
    """``conretriever generate``: step 2 of the synthetic data, resumable."""
    configure_logging(command.verbose)
    s, cs = command.settings(), command.client
    output_folder(s.out_dir, "--output")  # before any request is paid for
    if s.train_dir and command.convert:
        output_folder(s.train_dir, "--train_dir")
    tasks = load_tasks(s.tasks_file or s.out_dir / "tasks.jsonl", s.families)
    jobs = plan_requests(tasks, s)
    resumable = ResumableRun(s.out_dir, "examples", retry_rejects=s.retry_rejects)
    sender, plan = send_requests(resumable, jobs, answer, cs, command.batch)
    if command.batch.dry_run:
        return 0
    train_dir = s.train_dir or s.out_dir / "train"
    stats = write_training_file(resumable.records_path, train_dir) if command.convert else {}
    extra = {"tasks": len(tasks), **{f"train_{k}": v for k, v in stats.items()},
             **batch_extra(command.batch, sender, cs)}  # fmt: skip
    resumable.report(sender, cs, extra=extra)
    return 0


@dataclass
class ConvertSyntheticSettings:
    """``conretriever convert-synthetic`` flags: examples.jsonl -> the training file."""

    output: Path = output_opt(
        Path("synthetic_out"),
        help="the generate run's folder (its --output), holding examples.jsonl",
    )
    examples: Path | None = opt(None, help="none: OUT_DIR/examples.jsonl")
    train_dir: Path | None = opt(None, help="gets synthetic.jsonl (none: OUT_DIR/train)")


def run_convert(command: ConvertSyntheticSettings) -> int:
    configure_logging(False)
    examples = command.examples or command.output / "examples.jsonl"
    if not examples.exists():
        raise StoreError(f"{examples}: not found; run `conretriever generate` first")
    output_folder(command.train_dir or command.output / "train", "--train_dir")
    write_training_file(examples, command.train_dir or command.output / "train")
    return 0
