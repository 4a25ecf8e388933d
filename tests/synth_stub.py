"""A real HTTP stub of the OpenAI chat-completions API for the synthetic-data tests.

It listens on 127.0.0.1 (a free port), answers ``POST /v1/chat/completions`` deterministically
from the prompt and the request ``seed``, and injects faults chosen by a ``fault_for(key)``
policy, where ``key`` is a hash of (prompt, seed):

* transient ``"429"`` (with Retry-After), ``"500"`` and ``"timeout"`` (sleeps past the client's
  timeout) happen on the first attempt of a request only, so a correct client recovers;
* ``"malformed"`` (prose, no JSON) and ``"truncated"`` (cut-off JSON, finish_reason=length) happen
  on every attempt: the reply is bad and must end up in the rejects file;
* ``"fenced"`` wraps good JSON in a Markdown fence and chatter (must be parsed and kept);
* ``"always500"`` fails every attempt (the request must be reported as failed);
* ``"echo_key"`` answers 400 with the caller's bearer token in the message, as some servers do.

``served`` maps each key to what it finally got (``"good"``, a bad kind, or a fault);
``good_queries`` holds the query of every good step-2 reply: what the training file must contain.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRANSIENT = ("429", "500", "timeout")


def default_faults(key: str) -> str | None:
    """Deterministic fault mix: about half of all requests get one fault."""
    bucket = int(key[:8], 16) % 12
    return {0: "429", 1: "500", 2: "timeout", 3: "malformed", 4: "truncated", 5: "fenced"}.get(
        bucket
    )


def no_faults(key: str) -> str | None:
    return None


class StubLLM:
    def __init__(
        self,
        fault_for=default_faults,
        *,
        delay: float = 0.0,
        timeout_sleep: float = 4.0,
        retry_after: str = "0.05",
        reject_json_mode: bool = False,
    ):
        self.fault_for = fault_for
        self.delay = delay
        self.timeout_sleep = timeout_sleep
        self.retry_after = retry_after
        self.reject_json_mode = reject_json_mode
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()
        self.served: dict[str, str] = {}
        self.good_queries: set[str] = set()
        self.faults_seen: Counter = Counter()
        self.tokens_seen: set[str] = set()
        self.json_mode_requests = 0
        self.response_formats: list[dict] = []
        self.plain_requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return

            def do_POST(self):
                if self.path.startswith(("/v1/files", "/v1/batches")):
                    return stub.batch_api._handle(self, "POST")
                stub._handle(self)

            def do_GET(self):
                stub.batch_api._handle(self, "GET")

        self.batch_api = BatchAPI(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- request handling -------------------------------------------------------------------
    def _send(self, h, status: int, body: dict | str, headers: dict | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout fault): nothing to answer

    def _handle(self, h) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        token = h.headers.get("Authorization", "").removeprefix("Bearer ")
        prompt = body["messages"][-1]["content"]
        key = hashlib.sha1(f"{prompt}|{body.get('seed')}".encode()).hexdigest()
        json_mode = "response_format" in body
        with self.lock:
            self.tokens_seen.add(token)
            if json_mode:
                self.json_mode_requests += 1
                self.response_formats.append(body["response_format"])
            else:
                self.plain_requests += 1
            self.attempts[key] += 1
            first = self.attempts[key] == 1
        if self.delay:
            time.sleep(self.delay)
        if json_mode and self.reject_json_mode:
            err = {"error": {"message": "response_format is not supported", "type": "invalid"}}
            return self._send(h, 400, err)
        fault = self.fault_for(key)
        if fault in TRANSIENT and first or fault == "always500":
            with self.lock:
                self.faults_seen[fault] += 1
                self.served.setdefault(key, fault)
            if fault == "429":
                err = {"error": {"message": "rate limited", "type": "rate_limit"}}
                return self._send(h, 429, err, {"Retry-After": self.retry_after})
            if fault == "timeout":
                time.sleep(self.timeout_sleep)
            err = {"error": {"message": "internal error", "type": "server_error"}}
            return self._send(h, 500, err)
        if fault == "echo_key":
            msg = f"Incorrect API key provided: {token}. You can find your key at ..."
            with self.lock:
                self.served[key] = fault
            return self._send(h, 400, {"error": {"message": msg, "type": "invalid_request"}})
        self._send(h, 200, self._completion(body, key, fault))

    def _completion(self, body: dict, key: str, fault: str | None) -> dict:
        """The chat-completion body of a good (or malformed/truncated/fenced) reply."""
        prompt = body["messages"][-1]["content"]
        content, finish = self._reply(prompt, key, fault)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}
        return {
            "id": f"chatcmpl-{key[:12]}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
            "usage": {**usage, "total_tokens": sum(usage.values())},
        }

    def _reply(self, prompt: str, key: str, fault: str | None) -> tuple[str, str]:
        tag = key[:10]
        if '{"tasks": [...]}' in prompt:
            n = int(re.search(r"holds (\d+) strings", prompt).group(1))
            tasks = [
                f"Given a topic {tag} number {i}, retrieve documents about it." for i in range(n)
            ]
            # Every brainstorm reply repeats one task, so deduplication has work to do.
            tasks.append("Given a shared duplicate topic, retrieve documents about it.")
            obj, query = {"tasks": tasks}, None
        elif '"user_query"' in prompt:
            query = f"query {tag}"
            obj = {
                "user_query": query,
                "positive_document": f"A long relevant document for {tag}, full of answers.",
                "hard_negative_document": f"A document that only looks relevant to {tag}.",
            }
        elif '"input_text"' in prompt:
            query = f"input text {tag} to classify"
            obj = {"input_text": query, "label": f"label-{tag}", "misleading_label": "other"}
        elif '"S1"' in prompt:
            query = f"sentence one {tag}"
            obj = {"S1": query, "S2": f"sentence two {tag}", "S3": f"unrelated three {tag}"}
        else:
            raise AssertionError(f"stub: unrecognised prompt {prompt[:200]!r}")
        text = json.dumps(obj)
        with self.lock:
            if fault in ("malformed", "truncated", "fenced"):
                self.faults_seen[fault] += 1
            if fault in ("malformed", "truncated"):
                self.served[key] = fault
            else:
                self.served[key] = "good"
                if query is not None:
                    self.good_queries.add(query)
        if fault == "malformed":
            return "I am sorry, I cannot write that example right now.", "stop"
        if fault == "truncated":
            return text[: len(text) // 2], "length"
        if fault == "fenced":
            return f"Sure! Here is the example:\n```json\n{text}\n```\nHope it helps.", "stop"
        return text, "stop"


class BatchAPI:
    """The Files and Batches endpoints of the OpenAI API, enough for batch mode, on the stub's
    server. Each request line is answered by the stub's chat logic (``fault_for`` applies: a
    ``malformed`` key gets a malformed reply, as live). Switches, settable at any time:

    * ``polls_until_done``: retrieves of a batch before it completes (slow completion);
    * ``never_finish``: batches stay ``in_progress``;
    * ``fail_line(custom_id, submission)``: that line goes to the error file (HTTP 500) in the
      ``submission``-th batch holding it (1 = first);
    * ``expire_next``: that many batches end ``expired`` with only the first half answered;
    * ``hold(route)``: the next request on ``route`` (``upload``, ``create``, ``retrieve``,
      ``content``) blocks until ``release()``; ``create`` registers the batch before blocking
      (the server has it, the client has not heard back). ``arrived`` is set when it blocks.

    ``submissions`` counts batches created per input file id; ``lines_submitted`` counts how
    often each custom_id was in a created batch."""

    def __init__(self, stub: StubLLM):
        self.stub = stub
        self.lock = threading.Lock()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.polls: Counter = Counter()
        self.submissions: Counter = Counter()
        self.lines_submitted: Counter = Counter()
        self.polls_until_done = 0
        self.never_finish = False
        self.fail_line = lambda custom_id, submission: False
        self.expire_next = 0
        self.tokens_seen: set[str] = set()
        self.held: str | None = None
        self.arrived = threading.Event()
        self._release = threading.Event()

    def hold(self, route: str) -> None:
        self.held = route
        self.arrived.clear()
        self._release.clear()

    def release(self) -> None:
        self.held = None
        self._release.set()

    def _block(self, route: str) -> None:
        if self.held == route:
            self.arrived.set()
            self._release.wait(30)

    def _send(self, h, status: int, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json" if isinstance(body, dict)
                          else "application/octet-stream")  # fmt: skip
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed while we held its request

    def _handle(self, h, method: str) -> None:
        path = h.path.split("?")[0]
        with self.lock:
            self.tokens_seen.add(h.headers.get("Authorization", "").removeprefix("Bearer "))
        raw = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        parts = path.strip("/").split("/")  # v1, files|batches, [id], [content|cancel]
        if parts[1] == "files" and method == "POST":
            self._block("upload")
            return self._send(h, 200, self._upload(h.headers["Content-Type"], raw))
        if parts[1] == "files" and len(parts) == 4 and parts[3] == "content":
            self._block("content")
            return self._send(h, 200, self.files[parts[2]])
        if parts[1] == "batches" and method == "POST" and len(parts) == 2:
            batch = self._create(json.loads(raw))
            self._block("create")
            return self._send(h, 200, self._public(batch))
        if parts[1] == "batches" and len(parts) == 2:
            data = [self._public(b) for b in reversed(list(self.batches.values()))]
            return self._send(h, 200, {"object": "list", "data": data, "has_more": False,
                                       "first_id": data[0]["id"] if data else None,
                                       "last_id": data[-1]["id"] if data else None})  # fmt: skip
        if parts[1] == "batches" and len(parts) == 4 and parts[3] == "cancel":
            batch = self.batches[parts[2]]
            self._finish(batch, "cancelled", answered=len(batch["lines"]) // 2)
            return self._send(h, 200, self._public(batch))
        if parts[1] == "batches" and len(parts) == 3:
            self._block("retrieve")
            return self._send(h, 200, self._public(self._poll(self.batches[parts[2]])))
        return self._send(h, 404, {"error": {"message": f"no route {method} {path}"}})

    def _upload(self, content_type: str, raw: bytes) -> dict:
        message = BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields = {p.get_param("name", header="content-disposition"): p for p in message.walk()
                  if not p.is_multipart()}  # fmt: skip
        data = fields["file"].get_payload(decode=True)
        with self.lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": 0,
                "filename": fields["file"].get_filename(), "purpose": "batch",
                "status": "processed"}  # fmt: skip

    def _create(self, body: dict) -> dict:
        lines = [json.loads(x) for x in self.files[body["input_file_id"]].decode().splitlines()]
        with self.lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            self.submissions[body["input_file_id"]] += 1
            for line in lines:
                self.lines_submitted[line["custom_id"]] += 1
            expire = self.expire_next > 0
            self.expire_next -= int(expire)
            batch = {"id": batch_id, "input_file_id": body["input_file_id"], "lines": lines,
                     "status": "validating", "output_file_id": None, "error_file_id": None,
                     "metadata": body.get("metadata"), "expire": expire, "completed": 0,
                     "failed": 0, "endpoint": body["endpoint"],
                     "completion_window": body["completion_window"]}  # fmt: skip
            self.batches[batch_id] = batch
        return batch

    def _poll(self, batch: dict) -> dict:
        with self.lock:
            self.polls[batch["id"]] += 1
            polls = self.polls[batch["id"]]
        if batch["status"] in ("completed", "expired", "cancelled", "failed"):
            return batch
        if self.never_finish or polls <= self.polls_until_done:
            batch["status"] = "in_progress"
            return batch
        if batch["expire"]:
            self._finish(batch, "expired", answered=len(batch["lines"]) // 2)
        else:
            self._finish(batch, "completed", answered=len(batch["lines"]))
        return batch

    def _finish(self, batch: dict, status: str, answered: int) -> None:
        out, err = [], []
        for line in batch["lines"][:answered]:
            cid = line["custom_id"]
            if self.fail_line(cid, self.lines_submitted_in(batch, cid)):
                err.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "response": {
                            "status_code": 500,
                            "request_id": "r",
                            "body": {
                                "error": {"message": "internal error", "type": "server_error"}
                            },
                        },
                        "error": None,
                    }
                )
                continue
            body = line["body"]
            prompt = body["messages"][-1]["content"]
            key = hashlib.sha1(f"{prompt}|{body.get('seed')}".encode()).hexdigest()
            fault = self.stub.fault_for(key)
            fault = fault if fault in ("malformed", "truncated", "fenced") else None
            out.append({"id": f"req_{cid}", "custom_id": cid, "response": {
                "status_code": 200, "request_id": f"r_{cid}",
                "body": self.stub._completion(body, key, fault)}, "error": None})  # fmt: skip
        with self.lock:
            for name, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    file_id = f"file-{len(self.files) + 1}"
                    self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    batch[name] = file_id
            batch.update(status=status, completed=len(out), failed=len(err))

    def lines_submitted_in(self, batch: dict, custom_id: str) -> int:
        """How many created batches up to ``batch`` held ``custom_id`` (1 = its first)."""
        order = list(self.batches)
        upto = order[: order.index(batch["id"]) + 1]
        return sum(any(x["custom_id"] == custom_id for x in self.batches[b]["lines"])
                   for b in upto)  # fmt: skip

    @staticmethod
    def _public(batch: dict) -> dict:
        return {"id": batch["id"], "object": "batch", "endpoint": batch["endpoint"],
                "errors": None, "input_file_id": batch["input_file_id"],
                "completion_window": batch["completion_window"], "status": batch["status"],
                "output_file_id": batch["output_file_id"], "error_file_id": batch["error_file_id"],
                "created_at": 0, "metadata": batch["metadata"],
                "request_counts": {"total": len(batch["lines"]), "completed": batch["completed"],
                                   "failed": batch["failed"]}}  # fmt: skip
