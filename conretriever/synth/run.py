"""One resumable pass of requests: skip finished ids, run the rest, log every outcome once.

Both steps (brainstorm, generate) are "a list of requests with deterministic ids". A request ends
in one of three outcomes, each written as a single line by the main thread:

* **accepted**: the record goes to ``{stage}.jsonl`` (the data);
* **rejected**: the server answered but the reply is unusable (not JSON, truncated, a field
  missing); it goes to ``{stage}.rejects.jsonl`` with ``"final": true`` and is not asked again
  (unless ``--retry-rejects``): the same prompt would mostly fail the same way;
* **failed**: no answer after all retries (rate limits, 5xx, timeouts); it goes to the rejects
  file with ``"final": false`` and a rerun asks again, so an outage costs time, never data.

Reject line: ``{"id", "stage", "final", "reason", "reply", "finish_reason", ...request fields}``;
``reply`` is the raw text (first 4,000 characters) so bad replies can be inspected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from conretriever.files import writing
from conretriever.progress import Progress
from conretriever.synth.client import ClientSettings, Completion, FatalError
from conretriever.synth.store import AppendLog, read_jsonl

log = logging.getLogger(__name__)

OUTCOME_COUNTS = ("accepted", "rejected", "failed", "skipped")
REPLY_CHARS_KEPT = 4000  # enough to see what went wrong, small enough to keep rejects readable


def configure_logging(verbose: bool) -> None:
    """Progress lines on stderr; the HTTP library's per-request lines only with -v.

    Library loggers never go below INFO: their DEBUG output dumps request options, and nothing
    that could carry credentials should reach a log.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for name in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def run_bounded(
    jobs: Iterable, worker: Callable, concurrency: int
) -> Iterator[tuple[object, object, BaseException | None]]:
    """Run ``worker(job)`` on threads; yield ``(job, result, error)`` as each finishes.

    At most ``2 * concurrency`` jobs are queued at once, so a run over a million tasks holds a
    few futures in memory, not a million; the caller (one thread) does all file writes.
    """
    jobs, end = iter(jobs), object()
    pending: dict[Future, object] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            while True:
                while len(pending) < 2 * concurrency:
                    job = next(jobs, end)
                    if job is end:
                        break
                    pending[pool.submit(worker, job)] = job
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    err = fut.exception()
                    yield job, (None if err else fut.result()), err
        finally:
            for fut in pending:
                fut.cancel()


@dataclass
class Outcome:
    kind: str  # "accepted" | "rejected" | "failed"
    record: dict  # the data record, or the request fields of a reject
    reason: str = ""
    completion: Completion | None = None

    @classmethod
    def accepted(cls, record: dict, done: Completion) -> Outcome:
        return cls("accepted", record, completion=done)

    @classmethod
    def rejected(cls, meta: dict, reason: str, done: Completion) -> Outcome:
        if done.finish_reason == "length":
            reason = f"truncated reply (finish_reason=length): {reason}"
        return cls("rejected", meta, reason, done)

    @classmethod
    def failed(cls, meta: dict, reason: str) -> Outcome:
        return cls("failed", meta, reason)


@dataclass
class ResumableRun:
    out_dir: Path
    stage: str  # "brainstorm" | "examples": the file stem of the record and reject logs
    retry_rejects: bool = False
    counts: dict = field(default_factory=lambda: dict.fromkeys(OUTCOME_COUNTS, 0))

    @property
    def records_path(self) -> Path:
        return self.out_dir / f"{self.stage}.jsonl"

    @property
    def rejects_path(self) -> Path:
        return self.out_dir / f"{self.stage}.rejects.jsonl"

    def finished_ids(self) -> set[str]:
        done = {r["id"] for r in read_jsonl(self.records_path)}
        if not self.retry_rejects:
            done |= {r["id"] for r in read_jsonl(self.rejects_path) if r.get("final")}
        return done

    def execute(
        self,
        jobs: list[dict],
        worker: Callable[[dict], Outcome],
        concurrency: int,
        redact: Callable[[str], str] = str,
    ) -> None:
        finished = self.finished_ids()
        todo = [j for j in jobs if j["id"] not in finished]
        self.counts["skipped"] = len(jobs) - len(todo)
        log.info("[%s] %d requests: %d already done, %d to send", self.stage, len(jobs),
                 self.counts["skipped"], len(todo))  # fmt: skip
        if not todo:
            return
        bar = Progress(len(todo), f"[{self.stage}] requests", unit="requests")
        with (
            bar,
            AppendLog(self.records_path) as records,
            AppendLog(self.rejects_path) as rejects,
        ):
            for _, out, err in run_bounded(todo, worker, concurrency):
                if err is not None:
                    if isinstance(err, FatalError):
                        raise err
                    raise RuntimeError(f"[{self.stage}] worker crashed: {err!r}") from err
                self.record(out, records, rejects, redact)
                c = self.counts
                bar.set_postfix(kept=c["accepted"], rejected=c["rejected"], failed=c["failed"])
                bar.update(1)

    def record(self, out: Outcome, records: AppendLog, rejects: AppendLog,
               redact: Callable[[str], str] = str, *, final: bool = True,
               tag: dict | None = None) -> None:  # fmt: skip
        """Write one outcome, once: the data record, or a reject line. ``final=False`` marks a
        reject that a later pass asks again (batch mode's follow-up batches); ``tag`` adds
        fields to a reject line (the batch it came from)."""
        self.counts[out.kind] += 1
        done = out.completion
        if out.kind == "accepted":
            usage = {"prompt_tokens": done.prompt_tokens,
                     "completion_tokens": done.completion_tokens}  # fmt: skip
            records.append({**out.record, "usage": usage, "attempts": done.attempts})
            return
        rejects.append({
            **out.record,
            "stage": self.stage,
            "final": out.kind == "rejected" and final,
            "reason": redact(out.reason),
            "reply": redact(done.text[:REPLY_CHARS_KEPT]) if done else None,
            "finish_reason": done.finish_reason if done else None,
            **(tag or {}),
        })  # fmt: skip

    def report(self, client, settings: ClientSettings, extra: dict | None = None) -> dict:
        """Log the run's request/token/cost summary and append it to ``usage.jsonl``."""
        summary = {
            "stage": self.stage,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "base_url": settings.base_url,
            "model": settings.model,
            **self.counts,
            **(client.usage.as_dict(settings) if client else {}),
            **(extra or {}),
        }
        if self.counts["failed"]:
            log.warning("[%s] %d requests failed after retries; rerun the same command to retry "
                        "them", self.stage, self.counts["failed"])  # fmt: skip
        log.info("[%s] summary %s", self.stage, json.dumps(summary))
        with writing(self.out_dir / "usage.jsonl"):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "usage.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(summary) + "\n")
        return summary
