"""Batch mode: the synthetic-data requests as OpenAI Batch API jobs, or as files for an offline
batch engine (vLLM's ``run-batch``), resumable and never submitted twice.

At the E5 paper's scale (~500k requests) nobody sends requests one by one: the Batch API costs
half as much, and vLLM runs the same file format on a user's own GPUs. Batch mode sends the very
requests live mode would (same ids, same bodies: :func:`~conretriever.synth.client.chat_request`)
and reads every reply through the step's own ``answer`` (the same parsing, validation and reject
rules), so the records are those live mode makes from the same replies.

**Steps**, each recorded in ``<output>/<stage>.batches.json`` (ids only, never the key) before
anything waits on the server:

1. *plan*: the step's requests minus those already answered (records, and final rejects);
   ``--max_requests`` caps how many go out in this run;
2. *write*: one request line per id, ``{"custom_id", "method", "url", "body"}``, split so that no
   file holds more than :data:`MAX_REQUESTS_PER_BATCH` lines or :data:`MAX_BATCH_FILE_BYTES`
   bytes (the API's documented limits), into ``<output>/batches/<name>.input.jsonl`` (name:
   stage, run, round, part);
3. *upload* (``files.create``, purpose ``batch``) -> the file id is saved;
4. *submit* (``batches.create``) -> the batch id is saved. The state says ``submitting`` with the
   file id before the call, so a kill between the server accepting the batch and the id being
   saved is recovered: a rerun first looks for a batch of that input file (``batches.list``) and
   adopts it instead of submitting again;
5. *poll* every ``--poll_seconds``, one progress line per batch (completed / failed / total,
   status, elapsed), until every batch ends (``completed``, ``failed``, ``expired``,
   ``cancelled``) or ``--max_wait_hours`` passes (then one line saying how to resume);
6. *download* the output and error files next to the input (``.output.jsonl``, ``.errors.jsonl``);
7. *feed* each result line through ``answer``: accepted records and rejects are written as in live
   mode; ids already written are skipped, so a rerun after a kill halfway through writes nothing
   twice;
8. *follow up*: requests in the error file, missing from an expired, cancelled or failed batch,
   or whose reply failed validation go into the next round's batch, up to ``--batch_retries``
   rounds; a validation failure in the last round is a final reject (as in live mode).

``--mode offline`` does steps 1, 2 and 7 only: it writes the input files, prints the command for
vLLM's batch runner, and stops; the same command run again reads the ``.output.jsonl`` file next
to each input (vLLM's output lines have the Batch API's shape).

``--dry_run`` (either mode) prints the plan instead: requests, estimated input and output tokens
and cost; see :func:`estimate`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conretriever.errors import ConfigError, UserError
from conretriever.files import write_text, writing
from conretriever.options import opt
from conretriever.synth.client import (
    ClientSettings,
    Completion,
    RequestFailed,
    Usage,
    chat_request,
    completion_from_body,
    is_model_spec,
)
from conretriever.synth.run import Outcome, ResumableRun
from conretriever.synth.store import AppendLog, read_jsonl

log = logging.getLogger(__name__)

# The Batch API's documented limits for one batch (platform.openai.com/docs/guides/batch): an
# input file holds at most 50,000 requests and 200 MB. The only completion window is 24 hours.
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
COMPLETION_WINDOW = "24h"
ENDPOINT = "/v1/chat/completions"
DONE_STATUSES = ("completed", "failed", "expired", "cancelled")
# Dry-run token counts: the BERT WordPiece tokenizer that ships with embedded:minilm (offline,
# loads in a second). A provider's own tokenizer counts differently: this is an estimate.
TOKENIZER = "embedded:minilm"
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one chat message, as chat templates add


class BatchError(UserError):
    """A batch run cannot go on (never finished, server refused the file); state is kept."""


@dataclass
class BatchSettings:
    """How requests are sent: one by one (live), as Batch API jobs, or as offline batch files."""

    mode: Literal["live", "batch", "offline"] = opt(
        "live",
        help="live: one request at a time; batch: OpenAI Batch API jobs (half price, within 24 "
        "h); offline: write batch files for vLLM's run-batch, read its outputs on a rerun",
    )
    dry_run: bool = opt(False, help="print requests, estimated tokens and cost; send nothing")
    max_requests: int = opt(0, ge=0, help="send at most N requests in this run (0: all)")
    batch_retries: int = opt(
        2, ge=0, help="follow-up batches for failed, missing or invalid replies"
    )
    poll_seconds: float = opt(30.0, gt=0, help="seconds between two status checks of a batch")
    max_wait_hours: float = opt(
        26.0, gt=0, help="stop waiting after this long (rerun to resume); the window is 24 h"
    )
    batch_price_factor: float = opt(
        0.5, gt=0, help="batch price relative to --price_per_1k_* (the Batch API: half)"
    )
    max_requests_per_batch: int = opt(
        MAX_REQUESTS_PER_BATCH, ge=1, le=MAX_REQUESTS_PER_BATCH, help="split batches above N"
    )
    max_batch_bytes: int = opt(
        MAX_BATCH_FILE_BYTES, ge=1024, le=MAX_BATCH_FILE_BYTES, help="split files above N bytes"
    )


# ----- requests as lines --------------------------------------------------------------------
class _Deferred(Exception):
    """Raised by :class:`_Recorder` in place of an answer: carries the request body."""

    def __init__(self, body: dict):
        super().__init__("deferred to a batch")
        self.body = body


class _Recorder:
    """A stand-in client for ``answer``: records the body the live client would send."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings

    def chat(self, messages, *, temperature=None, max_tokens=None, seed=None, schema=None):
        s = self.settings
        temperature = s.temperature if temperature is None else temperature
        max_tokens = s.max_tokens if max_tokens is None else max_tokens
        json_mode = s.json_mode != "off"  # no fallback inside a batch: it is asked or not
        raise _Deferred(chat_request(s, messages, temperature, max_tokens, json_mode, seed, schema))


class _Replay:
    """A stand-in client for ``answer``: returns the batch's reply to this request."""

    def __init__(self, line: dict):
        self.line = line

    def chat(self, messages, **kwargs) -> Completion:
        response = self.line.get("response") or {}
        error = self.line.get("error")
        status = response.get("status_code", 200 if response else None)
        if error or status != 200 or not isinstance(response.get("body"), dict):
            detail = error or (response.get("body") or {}).get("error") or "no response body"
            raise RequestFailed(f"batch line failed (status {status}): {str(detail)[:400]}")
        return completion_from_body(response["body"])


def request_line(job: dict, answer: Callable, settings: ClientSettings) -> dict:
    """The batch input line of one job: the body ``answer`` would send live."""
    try:
        answer(_Recorder(settings), job)
    except _Deferred as deferred:
        return {"custom_id": job["id"], "method": "POST", "url": ENDPOINT, "body": deferred.body}
    raise AssertionError(f"{job['id']}: answer() returned without asking the client")


def split_lines(lines: list[dict], max_requests: int, max_bytes: int) -> list[list[bytes]]:
    """Encoded lines in file-sized parts: at most ``max_requests`` lines and ``max_bytes`` bytes
    each (a single line over ``max_bytes`` is an error: no batch could hold it)."""
    parts: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        data = (json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        if len(data) > max_bytes:
            raise BatchError(f"request {line['custom_id']}: {len(data)} bytes, over the "
                             f"{max_bytes}-byte batch file limit")  # fmt: skip
        if parts[-1] and (len(parts[-1]) >= max_requests or size + len(data) > max_bytes):
            parts.append([])
            size = 0
        parts[-1].append(data)
        size += len(data)
    return [p for p in parts if p]


# ----- the state file -----------------------------------------------------------------------
@dataclass
class BatchState:
    """``<output>/<stage>.batches.json``: every batch of the run and how far it got (ids and
    counts only). Saved write-then-rename after every change, so a kill leaves the last one."""

    path: Path
    batches: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> BatchState:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            batches = data["batches"]
            if not isinstance(batches, list) or not all(isinstance(b, dict) for b in batches):
                raise ValueError("field 'batches' is not a list of objects")
        except (ValueError, KeyError, TypeError) as exc:
            raise BatchError(
                f"{path}: damaged batch state ({exc}); it holds this run's batch ids: repair it "
                "or move it away to start over"
            ) from None
        return cls(path, batches)

    def save(self) -> None:
        write_text(self.path, json.dumps({"version": 1, "batches": self.batches}, indent=1) + "\n")

    def open_batches(self) -> list[dict]:
        return [b for b in self.batches if not b.get("fed")]

    def next_round(self) -> int:
        return 1 + max((b["round"] for b in self.batches), default=-1)


def state_file(resumable: ResumableRun) -> Path:
    """``<output>/<stage>.batches.json``: where a step's batch state lives."""
    return resumable.out_dir / f"{resumable.stage}.batches.json"


# ----- the run ------------------------------------------------------------------------------
@dataclass
class BatchRun:
    """One batch-mode pass of a step (see the module docstring); ``answer(client, job)`` is the
    step's own request-and-parse function."""

    resumable: ResumableRun
    answer: Callable[[object, dict], Outcome]
    client: ClientSettings
    settings: BatchSettings
    openai_client: object | None = None  # an ``openai.OpenAI``; None in offline mode
    redact: Callable[[str], str] = str
    sleep: Callable[[float], None] = time.sleep
    usage: Usage = field(default_factory=Usage)
    # unique per invocation (two runs can start within one second): names this run's batches
    run_id: str = field(default_factory=lambda: f"{time.strftime('%Y%m%dT%H%M%S')}-"
                        f"{secrets.token_hex(3)}")  # fmt: skip

    @property
    def folder(self) -> Path:
        return self.resumable.out_dir / "batches"

    @property
    def state_path(self) -> Path:
        return state_file(self.resumable)

    def execute(self, jobs: list[dict]) -> None:
        """Send what is missing, wait, and feed the results, round after round, until every
        request is answered or has had ``1 + batch_retries`` tries in this run."""
        state = BatchState.load(self.state_path)
        by_id = {j["id"]: j for j in jobs}
        while True:
            for batch in state.open_batches():
                self._advance(batch, state)
            if any(b["status"] not in DONE_STATUSES for b in state.open_batches()):
                return  # offline: the engine has not written its outputs yet
            for batch in state.open_batches():
                self._feed(batch, by_id, state)
            todo, exhausted = self._todo(jobs, state)
            if not todo:
                if exhausted:
                    log.warning("[%s] %d requests still unanswered after %d tries each; rerun "
                                "to ask again", self.resumable.stage, exhausted,
                                1 + self.settings.batch_retries)  # fmt: skip
                return
            self._write_round(todo, state)

    def _tries(self, state: BatchState) -> dict[str, int]:
        """Request id -> batches of this run that answered it badly or not at all."""
        ours = {b["name"] for b in state.batches if b.get("run") == self.run_id}
        tries: dict[str, int] = {}
        for r in read_jsonl(self.resumable.rejects_path):
            if r.get("batch") in ours:
                tries[r["id"]] = tries.get(r["id"], 0) + 1
        return tries

    def _todo(self, jobs: list[dict], state: BatchState) -> tuple[list[dict], int]:
        """(jobs to put in a new batch, how many are left out for having used their tries):
        no record and no final reject yet, under ``1 + batch_retries`` tries in this run,
        capped by ``--max_requests`` over the batches this run made."""
        finished = self.resumable.finished_ids()
        tries = self._tries(state)
        limit = 1 + self.settings.batch_retries
        open_ = [j for j in jobs if j["id"] not in finished]
        todo = [j for j in open_ if tries.get(j["id"], 0) < limit]
        exhausted = len(open_) - len(todo)
        cap = self.settings.max_requests
        if cap:
            first_tries = sum(b["requests"] for b in state.batches
                              if b.get("run") == self.run_id and b["round"] == 0)  # fmt: skip
            fresh = [j for j in todo if j["id"] not in tries]
            room = max(0, cap - first_tries)
            todo = [j for j in todo if j["id"] in tries] + fresh[:room]
        return todo, exhausted

    def _write_round(self, todo: list[dict], state: BatchState) -> None:
        mine = [b["round"] for b in state.batches if b.get("run") == self.run_id]
        round_ = 1 + max(mine, default=-1)
        lines = [request_line(job, self.answer, self.client) for job in todo]
        parts = split_lines(lines, self.settings.max_requests_per_batch,
                            self.settings.max_batch_bytes)  # fmt: skip
        with writing(self.folder, "--output"):
            self.folder.mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parts):
            name = f"{self.resumable.stage}-{self.run_id}-r{round_}-{i:03d}"
            write_text(self.folder / f"{name}.input.jsonl", b"".join(part).decode("utf-8"))
            state.batches.append({"name": name, "run": self.run_id, "round": round_,
                                  "requests": len(part), "status": "written"})  # fmt: skip
            state.save()
        log.info("[%s] round %d: %d requests in %d batch file(s) under %s", self.resumable.stage,
                 round_, len(lines), len(parts), self.folder)  # fmt: skip

    def _files(self, batch: dict) -> tuple[Path, Path, Path]:
        stem = self.folder / batch["name"]
        return (Path(f"{stem}.input.jsonl"), Path(f"{stem}.output.jsonl"),
                Path(f"{stem}.errors.jsonl"))  # fmt: skip

    def _advance(self, batch: dict, state: BatchState) -> None:
        """Move one batch as far as it goes now: upload, submit, wait, download (batch mode),
        or look for the engine's output (offline)."""
        source, output, errors = self._files(batch)
        if self.settings.mode == "offline":
            if output.exists():
                batch["status"] = "completed"
                state.save()
            else:
                log.info("[%s] %s waits for its output; run\n  vllm run-batch -i %s -o %s "
                         "--model %s\nthen this command again", self.resumable.stage,
                         batch["name"], source, output, self.client.model)  # fmt: skip
            return
        api = self.openai_client
        if "file_id" not in batch:
            with open(source, "rb") as handle:
                batch["file_id"] = api.files.create(file=handle, purpose="batch").id
            state.save()
        if "batch_id" not in batch:
            found = self._submitted(batch["file_id"]) if batch["status"] == "submitting" else None
            if found is None:
                batch["status"] = "submitting"  # saved before the call: see _submitted
                state.save()
                found = api.batches.create(
                    input_file_id=batch["file_id"], endpoint=ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata={"conretriever": batch["name"]},
                ).id  # fmt: skip
            batch.update(batch_id=found, status="submitted", submitted_at=time.time())
            state.save()
        if batch["status"] not in DONE_STATUSES:
            self._wait(batch, state)
        if not batch.get("downloaded"):
            info = api.batches.retrieve(batch["batch_id"])
            for file_id, path in ((info.output_file_id, output), (info.error_file_id, errors)):
                if file_id:
                    write_text(path, api.files.content(file_id).text)
            batch["downloaded"] = True
            state.save()

    def _submitted(self, file_id: str) -> str | None:
        """The id of a batch the server already made from ``file_id`` (the run was killed
        between submitting and saving the id), or None."""
        for found in self.openai_client.batches.list(limit=100):  # iterating pages through
            if getattr(found, "input_file_id", None) == file_id:
                log.info("[%s] batch %s of %s was submitted before; following it",
                         self.resumable.stage, found.id, file_id)  # fmt: skip
                return found.id
        return None

    def _wait(self, batch: dict, state: BatchState) -> None:
        start = batch["submitted_at"]
        while True:
            info = self.openai_client.batches.retrieve(batch["batch_id"])
            counts = info.request_counts
            done, failed, total = ((counts.completed, counts.failed, counts.total) if counts
                                   else (0, 0, batch["requests"]))  # fmt: skip
            elapsed = time.time() - start
            log.info("[%s] batch %s (%s): %s, %d/%d completed, %d failed, %.1f min elapsed",
                     self.resumable.stage, batch["name"], batch["batch_id"], info.status, done,
                     total, failed, elapsed / 60)  # fmt: skip
            if info.status in DONE_STATUSES:
                batch["status"] = info.status
                state.save()
                return
            if elapsed > self.settings.max_wait_hours * 3600:
                raise BatchError(
                    f"batch {batch['batch_id']} ({batch['name']}) is still {info.status} after "
                    f"{elapsed / 3600:.2f} h; its ids are saved in {state.path}: rerun the same "
                    "command to keep waiting (nothing is submitted again)"
                )
            self.sleep(self.settings.poll_seconds)

    def _feed(self, batch: dict, by_id: dict[str, dict], state: BatchState) -> None:
        """Every result line of a finished batch through ``answer``, once per id; ids the
        batch holds but did not answer (expired, cancelled, failed) are logged as failed."""
        source, output, errors = self._files(batch)
        lines = {}
        for line in [*read_jsonl(output), *read_jsonl(errors)]:
            lines.setdefault(line.get("custom_id"), line)
        asked = [json.loads(x)["custom_id"] for x in source.read_text("utf-8").splitlines()]
        r = self.resumable
        finished = r.finished_ids()
        fed = {x["id"] for x in read_jsonl(r.rejects_path) if x.get("batch") == batch["name"]}
        tries = self._tries(state)
        last_try = self.settings.batch_retries  # a reject on this try is final
        missing = 0
        with AppendLog(r.records_path) as records, AppendLog(r.rejects_path) as rejects:
            for rid in asked:
                job = by_id.get(rid)
                if job is None or rid in finished or rid in fed:
                    continue
                line = lines.get(rid)
                if line is None:
                    missing += 1
                    line = {"custom_id": rid, "error": f"no result: batch {batch['status']}"}
                out = self.answer(_Replay(line), job)
                if out.completion is not None:
                    self.usage.add(requests=1, prompt_tokens=out.completion.prompt_tokens,
                                   completion_tokens=out.completion.completion_tokens)  # fmt: skip
                final = tries.get(rid, 0) >= last_try
                r.record(out, records, rejects, self.redact, final=final,
                         tag={"batch": batch["name"]})  # fmt: skip
        if missing:
            log.warning("[%s] batch %s ended %s with %d of %d requests unanswered; they are "
                        "asked again in a follow-up batch", r.stage, batch["name"],
                        batch["status"], missing, len(asked))  # fmt: skip
        batch["fed"] = True
        state.save()


# ----- the dry run --------------------------------------------------------------------------
def count_tokens(texts: list[str]) -> list[int]:
    """Tokens of each text by :data:`TOKENIZER` (no special tokens)."""
    from transformers import AutoTokenizer

    from conretriever.model.specs import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(TOKENIZER))
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def estimate(lines: list[dict], records: list[dict], client: ClientSettings,
             settings: BatchSettings) -> dict:  # fmt: skip
    """What sending ``lines`` would take: requests, batch files, input tokens (every message's
    content counted by :data:`TOKENIZER`, plus :data:`MESSAGE_OVERHEAD_TOKENS` a message),
    output tokens (the mean completion of the run's ``records`` so far times the requests, or
    the ``max_tokens`` upper bound when there are none), and the cost at the client's prices
    (times ``batch_price_factor`` in batch mode; offline engines run on your own hardware)."""
    contents = [m.get("content") or "" for line in lines for m in line["body"]["messages"]]
    input_tokens = sum(count_tokens(contents)) + MESSAGE_OVERHEAD_TOKENS * len(contents)
    upper = sum(line["body"].get("max_tokens") or 0 for line in lines)
    seen = [r["usage"]["completion_tokens"] for r in records if r.get("usage")]
    mean = sum(seen) / len(seen) if seen else None
    output_tokens = round(mean * len(lines)) if mean is not None else upper
    factor = {"live": 1.0, "batch": settings.batch_price_factor, "offline": 0.0}[settings.mode]
    cost = factor * (input_tokens / 1000 * client.price_per_1k_input
                     + output_tokens / 1000 * client.price_per_1k_output)  # fmt: skip
    files = len(split_lines(lines, settings.max_requests_per_batch, settings.max_batch_bytes))
    return {"requests": len(lines), "batch_files": files if settings.mode != "live" else 0,
            "input_tokens": input_tokens, "output_tokens": output_tokens,
            "output_tokens_upper_bound": upper, "output_mean_of": len(seen),
            "price_factor": factor, "estimated_cost_usd": round(cost, 6)}  # fmt: skip


def print_estimate(stage: str, plan: dict, skipped: int, client: ClientSettings, mode: str):
    p = plan
    mean = (f"mean completion of {p['output_mean_of']} replies so far x {p['requests']}"
            if p["output_mean_of"] else "max_tokens x requests: an upper bound")  # fmt: skip
    price = (f"at ${client.price_per_1k_input}/1k in, ${client.price_per_1k_output}/1k out, "
             f"x {p['price_factor']} ({mode} price)")  # fmt: skip
    print(f"[{stage}] dry run, {mode} mode: {p['requests']:,} requests to send "
          f"({skipped:,} already answered), {p['batch_files']} batch file(s)\n"
          f"  input tokens  ~{p['input_tokens']:,} ({TOKENIZER} WordPiece count, "
          f"+{MESSAGE_OVERHEAD_TOKENS} a message)\n"
          f"  output tokens ~{p['output_tokens']:,} ({mean}; at most "
          f"{p['output_tokens_upper_bound']:,})\n"
          f"  cost          ~${p['estimated_cost_usd']:,.2f} {price}")  # fmt: skip


def batch_extra(settings: BatchSettings, sender, client: ClientSettings) -> dict:
    """The usage report's mode fields: batch mode's cost is the live cost times the factor."""
    if settings.mode == "live" or sender is None:
        return {}
    factor = settings.batch_price_factor if settings.mode == "batch" else 0.0
    return {"mode": settings.mode, "price_factor": factor,
            "estimated_cost_usd": round(sender.usage.cost(client) * factor, 6)}  # fmt: skip


def send_requests(
    resumable: ResumableRun,
    jobs: list[dict],
    answer: Callable,
    client_settings: ClientSettings,
    settings: BatchSettings,
) -> tuple[object, dict]:
    """Send a step's requests in the chosen mode (live, batch or offline), or with ``dry_run``
    only print what that would take. Returns (what ``ResumableRun.report`` reads ``usage``
    from, or None; the plan of a dry run, else {})."""
    from conretriever.synth.client import LLMClient

    finished = resumable.finished_ids()
    todo = [j for j in jobs if j["id"] not in finished]
    if settings.max_requests:
        todo = todo[: settings.max_requests]
    if settings.dry_run:
        lines = [request_line(job, answer, client_settings) for job in todo]
        plan = estimate(lines, read_jsonl(resumable.records_path), client_settings, settings)
        print_estimate(resumable.stage, plan, len(jobs) - len(todo), client_settings,
                       settings.mode)  # fmt: skip
        return None, plan
    pending = todo or BatchState.load(state_file(resumable)).open_batches()
    if settings.mode == "live" or not pending:
        # No client (and no key check) when nothing is left to send: execute logs "all done".
        client = LLMClient(client_settings) if todo else None
        keep = finished | {j["id"] for j in todo}
        redact = client.redact if client else str
        resumable.execute([j for j in jobs if j["id"] in keep], lambda job: answer(client, job),
                          client_settings.concurrency, redact)  # fmt: skip
        return client, {}
    api, redact = None, str
    if settings.mode == "batch":
        if is_model_spec(client_settings.base_url):
            raise ConfigError(f"--mode batch needs an endpoint with the Batch API, not the local "
                              f"model {client_settings.base_url}: use --mode live, or --mode "
                              "offline for vLLM's batch runner")  # fmt: skip
        client = LLMClient(client_settings)  # the key check, and the openai client it holds
        api, redact = client.openai_client, client.redact
    run = BatchRun(resumable, answer, client_settings, settings, api, redact)
    run.execute(jobs)
    return run, {}
