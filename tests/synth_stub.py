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
                stub._handle(self)

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
        content, finish = self._reply(prompt, key, fault)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split())}
        self._send(
            h,
            200,
            {
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
            },
        )

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
