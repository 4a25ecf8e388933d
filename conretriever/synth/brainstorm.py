"""Synthetic data, step 1: brainstorm task descriptions (``conretriever brainstorm``).

For each brainstormed family (short-long, long-short, short-short, long-long) the run sends
``--requests-per-family`` requests. Request ``i`` has the id ``brainstorm:{family}:{i}:seed{seed}``
and everything random about it (which seed tasks are shown, the temperature) is drawn from a
``random.Random`` seeded by that id, so a rerun sends the very same prompt.

Files in ``--output``:

* ``brainstorm.jsonl``: one record per answered request (id, family, the tasks it produced);
* ``brainstorm.rejects.jsonl``: replies that held no usable task list, and requests that failed
  after all retries, each with its reason;
* ``tasks.jsonl``: the result, derived from the records after every run: one line
  ``{"family", "task", "key"}`` per distinct task (normalised-text duplicates removed, first seen
  wins in request order), plus the fixed STS task and one bitext task per language pair
  (bitext lines also carry ``source_language`` / ``target_language``). Step 2 reads this file.

Resume: ids already in ``brainstorm.jsonl``, or rejected for a bad reply, are skipped; requests that
failed on the transport are asked again (``--retry-rejects`` also re-asks bad replies).
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
    dedup_key,
    read_jsonl,
    request_seed,
    text_hash,
    write_jsonl_atomic,
)

log = logging.getLogger(__name__)

# Brainstorm temperatures spread around --temperature: hotter requests invent more unusual
# tasks, cooler ones stay close to the seeds; the mix gives breadth without much junk.
TEMPERATURE_OFFSETS = (-0.3, 0.0, 0.3)


@dataclass
class BrainstormJob:
    out_dir: Path
    families: tuple[str, ...] = prompts.FAMILIES
    requests_per_family: int = 4
    tasks_per_request: int = 20  # the paper asks for "about 20" tasks per request
    examples_shown: int = 3  # seed tasks shown per request, drawn afresh for each request
    max_tasks_per_family: int = 0  # 0 = keep all distinct tasks
    bitext_pairs: tuple[tuple[str, str], ...] = ()  # () = the pairs in seed_tasks/bitext.json
    seed: int = 0
    retry_rejects: bool = False


def parse_task_list(reply: object) -> list[str]:
    """Task strings from a step-1 reply: ``{"tasks": [...]}``, any one-list object, or a list."""
    items = reply
    if isinstance(reply, dict):
        lists = [v for v in reply.values() if isinstance(v, list)]
        items = reply["tasks"] if isinstance(reply.get("tasks"), list) else None
        if items is None and len(lists) == 1:
            items = lists[0]
    if not isinstance(items, list):
        raise ReplyParseError('expected {"tasks": [...]} or a JSON list of strings')
    # A task is a sentence; shorter strings are labels or fragments, not task descriptions.
    tasks = [" ".join(t.split()) for t in items if isinstance(t, str) and len(t.split()) >= 3]
    if not tasks:
        raise ReplyParseError(f"no task description of 3+ words among {len(items)} list items")
    return tasks


def plan_requests(s: BrainstormJob, temperature: float) -> list[dict]:
    jobs = []
    for family in s.families:
        if family not in prompts.BRAINSTORMED:
            continue
        seeds = prompts.load_seed_file(family)["tasks"]
        for i in range(s.requests_per_family):
            rid = f"brainstorm:{family}:{i}:seed{s.seed}"
            rng = random.Random(rid)
            shown = rng.sample(seeds, min(s.examples_shown, len(seeds)))
            temp = min(2.0, max(0.0, temperature + rng.choice(TEMPERATURE_OFFSETS)))
            jobs.append(
                {
                    "id": rid,
                    "family": family,
                    "request_index": i,
                    "seed": s.seed,
                    "temperature": round(temp, 3),
                    "examples_shown": shown,
                    "messages": prompts.brainstorm_messages(family, shown, s.tasks_per_request),
                }
            )
    return jobs


def answer(client: LLMClient, job: dict) -> Outcome:
    meta = {k: job[k] for k in ("id", "family", "request_index", "seed", "temperature")}
    try:
        done = client.chat(
            job["messages"],
            temperature=job["temperature"],
            seed=request_seed(job["id"]),
            schema=prompts.reply_schema(None),
        )
    except RequestFailed as exc:
        return Outcome.failed(meta, str(exc))
    try:
        tasks = parse_task_list(extract_json(done.text))
    except ReplyParseError as exc:
        return Outcome.rejected(meta, str(exc), done)
    record = {**meta, "examples_shown": job["examples_shown"], "tasks": tasks}
    return Outcome.accepted(record, done)


def derive_tasks(s: BrainstormJob) -> list[dict]:
    """The distinct tasks of this run's families, in request order, plus the fixed tasks."""
    records = read_jsonl(s.out_dir / "brainstorm.jsonl")
    records = [r for r in records if r.get("family") in s.families and r.get("seed") == s.seed]
    records.sort(key=lambda r: (prompts.FAMILIES.index(r["family"]), r["request_index"]))
    rows, seen = [], set()
    for rec in records:
        for text in rec["tasks"]:
            key = (rec["family"], dedup_key(text))
            if key not in seen:
                seen.add(key)
                rows.append({"family": rec["family"], "task": text, "key": text_hash(text)})
    if s.max_tasks_per_family:
        kept: dict[str, int] = {}
        capped = []
        for row in rows:
            kept[row["family"]] = kept.get(row["family"], 0) + 1
            if kept[row["family"]] <= s.max_tasks_per_family:
                capped.append(row)
        rows = capped
    for family in ("sts", "bitext"):
        if family not in s.families:
            continue
        if family == "bitext" and s.bitext_pairs:
            fixed = [prompts.bitext_task(src, tgt) for src, tgt in s.bitext_pairs]
        else:
            fixed = prompts.fixed_tasks(family)
        for t in fixed:
            row = {"family": family, "task": t.text, "key": text_hash(t.text)}
            if family == "bitext":
                row.update(source_language=t.source_language, target_language=t.target_language)
            rows.append(row)
    return rows


@dataclass
class BrainstormSettings:
    """``conretriever brainstorm`` flags."""

    output: Path = output_opt(
        Path("synthetic_out"), help="run folder: requests log, rejects, usage, tasks.jsonl"
    )
    families: list[str] = opt(
        default_factory=lambda: ["all"],
        choices=("all", *prompts.FAMILIES),
        help="task families (comma or space separated)",
    )
    requests_per_family: int = opt(4, ge=1, help="brainstorm requests per family")
    tasks_per_request: int = opt(20, ge=1, help="the paper asks for about 20 per request")
    examples_shown: int = opt(3, ge=1, help="seed tasks shown per request, drawn afresh")
    max_tasks_per_family: int = opt(0, ge=0, help="keep at most N distinct tasks (0: all)")
    bitext_pairs: list[str] = opt(
        default_factory=list,
        commas="split",  # a language name holds no comma: "English-French,German-English" = 2
        help="SRC-TGT language pairs, space or comma separated (none: seed_tasks/bitext.json's)",
    )
    seed: int = opt(0)
    retry_rejects: bool = opt(False, help="re-ask requests whose replies were rejected")
    verbose: bool = opt(False, aliases=("v",), help="log every retry")
    # 20 one-sentence tasks: ~600 tokens
    client: ClientSettings = opt(default_factory=lambda: ClientSettings(max_tokens=1024))
    batch: BatchSettings = opt(default_factory=BatchSettings)

    def settings(self) -> BrainstormJob:
        pairs = tuple(tuple(p.split("-", 1)) for p in self.bitext_pairs)
        if any(len(p) != 2 or not all(p) for p in pairs):
            raise ConfigError(f"--bitext_pairs {self.bitext_pairs}: expected SRC-TGT items")
        families = prompts.FAMILIES if "all" in self.families else tuple(self.families)
        return BrainstormJob(
            out_dir=self.output,
            families=families,
            requests_per_family=self.requests_per_family,
            tasks_per_request=self.tasks_per_request,
            examples_shown=self.examples_shown,
            max_tasks_per_family=self.max_tasks_per_family,
            bitext_pairs=pairs,
            seed=self.seed,
            retry_rejects=self.retry_rejects,
        )


def run(command: BrainstormSettings) -> int:
    """``conretriever brainstorm``: step 1 of the synthetic data, resumable."""
    configure_logging(command.verbose)
    s, cs = command.settings(), command.client
    output_folder(s.out_dir, "--output")  # before any request is paid for
    jobs = plan_requests(s, cs.temperature)
    resumable = ResumableRun(s.out_dir, "brainstorm", retry_rejects=s.retry_rejects)
    # No client (and no key check) when nothing needs the LLM, e.g. only sts/bitext.
    sender, plan = send_requests(resumable, jobs, answer, cs, command.batch)
    if command.batch.dry_run:
        return 0
    n = write_jsonl_atomic(s.out_dir / "tasks.jsonl", derive_tasks(s))
    resumable.report(sender, cs, extra={"tasks": n, **batch_extra(command.batch, sender, cs)})
    return 0
