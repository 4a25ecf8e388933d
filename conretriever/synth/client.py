"""A careful OpenAI-compatible chat client for long synthetic-data runs.

A run sends thousands of requests to an endpoint that will, at some point, rate-limit (429),
fail (5xx), hang (timeout) or drop the connection. The client turns that into three outcomes:

* a ``Completion`` (text, finish reason, token counts);
* ``RequestFailed`` for one request that could not be answered after the retry cap, or that the
  server refused for good (e.g. 400); the caller records it as a reject and a rerun tries again;
* ``FatalError`` for problems every request would hit (bad key, unknown model): stop the run.

Retries are ours alone (the openai client gets ``max_retries=0``): attempt ``k`` waits
``d/2 + U(0, d/2)`` seconds with ``d = min(backoff_max, backoff_base * 2**k)`` (exponential backoff,
with jitter so that concurrent workers do not retry in lock-step), or the server's ``Retry-After``
when it sends one. JSON mode (``response_format={"type": "json_object"}``) is asked for by default;
when the server rejects that parameter (400/422), the request is sent again without it and the
rest of the run goes on without JSON mode. The API key comes from ``OPENAI_API_KEY``, is never
logged, and is scrubbed from any error text that the caller might store.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from conretriever.errors import UserError
from conretriever.options import opt

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
# A dummy key for local servers, which ignore it; the openai client refuses an empty key.
LOCAL_DUMMY_KEY = "sk-local-no-key"
# Retry-After is honoured up to this bound; a larger value usually means a quota is exhausted,
# and waiting an hour per request is worse than failing the request and rerunning later.
MAX_RETRY_AFTER_S = 600.0
RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
FATAL_STATUS = frozenset({401, 403, 404})  # bad key, no access, unknown model/path


class RequestFailed(Exception):
    """One request could not be answered; ``str(exc)`` is the reject reason (key-free)."""


class FatalError(UserError):
    """Every request would fail the same way (bad key, unknown model): stop the run."""


@dataclass
class ClientSettings:
    """The endpoint and how to talk to it (key from ``$OPENAI_API_KEY``, never logged)."""

    base_url: str = opt(
        "http://127.0.0.1:8000/v1",
        help="OpenAI-compatible /v1 URL, or a local model spec (embedded:gemma-3-270m) to serve "
        "in-process on a loopback port",
    )
    model: str = opt("gpt-4o-mini", help="the model name the endpoint serves")
    concurrency: int = opt(4, ge=1, help="parallel requests (raise for hosted APIs)")
    max_retries: int = opt(
        6, ge=0, help="retries after the first attempt; 6 doublings of 1 s reach ~1 min"
    )
    backoff_base: float = opt(1.0, gt=0, help="seconds before the first retry")
    backoff_max: float = opt(60.0, gt=0, help="cap on the wait between retries, seconds")
    timeout: float = opt(
        120.0, gt=0, help="seconds per attempt (a 500-word document: ~30 s on a slow server)"
    )
    json_mode: Literal["auto", "on", "off", "schema"] = opt(
        "auto",
        help="auto: ask for JSON mode, fall back when rejected; schema: also send the reply's "
        "JSON schema (llama.cpp form), which makes small local models emit our keys",
    )
    temperature: float = opt(1.0, ge=0)
    max_tokens: int = opt(2048, ge=1, help="two 500-word documents plus a query: ~1,600 tokens")
    price_per_1k_input: float = opt(0.0, ge=0, help="USD per 1,000 prompt tokens (cost report)")
    price_per_1k_output: float = opt(0.0, ge=0, help="USD per 1,000 completion tokens")
    api_key_env: str = opt("OPENAI_API_KEY", help="environment variable holding the API key")


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


@dataclass
class Usage:
    """Per-run counters, safe to update from worker threads."""

    requests: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def cost(self, s: ClientSettings) -> float:
        return (
            self.prompt_tokens / 1000 * s.price_per_1k_input
            + self.completion_tokens / 1000 * s.price_per_1k_output
        )

    def as_dict(self, s: ClientSettings) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "failed": self.failed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "estimated_cost_usd": round(self.cost(s), 6),
        }


def is_model_spec(base_url: str) -> bool:
    """A ``--base-url`` that names a local model (``embedded:gemma-3-270m``, a folder) instead of
    an ``http(s)://`` endpoint: the client serves it itself (``conretriever.synth.local_llm``)."""
    return not base_url.startswith(("http://", "https://"))


def is_local(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    return host in LOCAL_HOSTS or host.startswith("127.")


def resolve_api_key(s: ClientSettings) -> str:
    key = os.environ.get(s.api_key_env, "").strip()
    if key:
        return key
    if is_local(s.base_url):
        return LOCAL_DUMMY_KEY
    raise FatalError(
        f"{s.api_key_env} is not set; it is required for the non-local endpoint {s.base_url} "
        f"(export {s.api_key_env}=... ; local servers on 127.0.0.1/localhost need no key)"
    )


def retry_after_seconds(headers) -> float | None:
    """Seconds from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def chat_request(s: ClientSettings, messages: list[dict], temperature: float, max_tokens: int,
                 json_mode: bool, seed: int | None, schema: dict | None) -> dict:  # fmt: skip
    """The body of one chat-completions request: what live mode sends and batch mode writes."""
    body: dict = {"model": s.model, "messages": messages, "temperature": temperature,
                  "max_tokens": max_tokens}  # fmt: skip
    if json_mode:
        body["response_format"] = {"type": "json_object"}
        if schema is not None and s.json_mode == "schema":
            body["response_format"]["schema"] = schema
    if seed is not None:
        body["seed"] = seed
    return body


def completion_from_body(body: dict) -> Completion:
    """A :class:`Completion` from a chat-completions response body (a batch result line's
    ``response.body``), read the way live mode reads the client's response object."""
    choices = body.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    usage = body.get("usage") or {}
    return Completion(
        text=(choice.get("message") or {}).get("content") or "",
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        attempts=1,
    )


class LLMClient:
    """Thread-safe chat client: one instance per run, shared by all worker threads."""

    def __init__(self, settings: ClientSettings, *, sleep: Callable[[float], None] = time.sleep):
        import openai  # lazy: importing the synth package must stay cheap

        self.settings = settings
        base_url = settings.base_url
        self.local_server = None
        if is_model_spec(base_url):  # e.g. embedded:gemma-3-270m: serve it here, over HTTP
            from conretriever.synth.local_llm import start_server

            log.info("starting a local OpenAI-compatible server for %s", base_url)
            self.local_server = start_server(base_url)
            base_url = self.local_server.url
        self._key = resolve_api_key(settings) if self.local_server is None else LOCAL_DUMMY_KEY
        self._openai = openai
        self._client = openai.OpenAI(
            api_key=self._key,
            base_url=base_url,
            timeout=settings.timeout,
            max_retries=0,  # our retry loop is the only one
        )
        self._sleep = sleep
        self._rng = random.Random()  # jitter only; never affects what is generated
        self._json_mode = settings.json_mode != "off"
        self.usage = Usage()

    @property
    def openai_client(self):
        """The ``openai.OpenAI`` underneath (batch mode's files and batches endpoints)."""
        return self._client

    def redact(self, text: str) -> str:
        """``text`` with the API key removed (error bodies sometimes echo part of it)."""
        if self._key and self._key != LOCAL_DUMMY_KEY:
            text = text.replace(self._key, "***")
        return text

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            wait_s = min(retry_after, MAX_RETRY_AFTER_S)
            return wait_s + self._rng.uniform(0, 0.1 * wait_s)
        d = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        return d / 2 + self._rng.uniform(0, d / 2)

    def _create(self, messages: list[dict], temperature: float, max_tokens: int, json_mode: bool,
                seed: int | None, schema: dict | None):  # fmt: skip
        body = chat_request(self.settings, messages, temperature, max_tokens, json_mode, seed,
                            schema)  # fmt: skip
        return self._client.chat.completions.create(**body)

    def chat(
        self,
        messages: list[dict],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        schema: dict | None = None,
    ) -> Completion:
        """One chat completion. ``seed`` asks the server for reproducible sampling (OpenAI, vLLM
        and llama.cpp honour it, best effort): requests with the same prompt but different ids
        then still get different answers, and a rerun of one id gets the same answer. ``schema``
        (a JSON schema of the reply) is sent only with ``json_mode="schema"``.

        The retry loop is ours, not the client's ``max_retries`` (it is built with 0): between
        two attempts it may drop JSON mode for an endpoint that rejects it, it counts retries and
        failures into the run's usage report, separates fatal statuses (bad key, unknown model)
        from retryable ones, and caps a server's Retry-After; the client's loop does none of
        these. It honours Retry-After the same way (``retry_after_seconds``)."""
        s, oa = self.settings, self._openai
        temperature = s.temperature if temperature is None else temperature
        max_tokens = s.max_tokens if max_tokens is None else max_tokens
        self.usage.add(requests=1)
        attempt = 0
        while True:
            json_mode = self._json_mode
            try:
                resp = self._create(messages, temperature, max_tokens, json_mode, seed, schema)
                break
            except oa.APIStatusError as exc:
                code = exc.status_code
                if code in (400, 422) and json_mode and s.json_mode in ("auto", "schema"):
                    # The server may not know response_format: ask once more without it.
                    try:
                        resp = self._create(messages, temperature, max_tokens, False, seed, None)
                    except (oa.APIStatusError, oa.APIConnectionError):
                        pass  # not JSON mode's fault: handle the first error as usual
                    else:
                        if self._json_mode:
                            log.warning(
                                "endpoint rejected JSON mode (HTTP %s); continuing without", code
                            )
                        self._json_mode = False
                        break
                reason = self.redact(f"HTTP {code}: {exc.message}")[:500]
                if code in FATAL_STATUS:
                    raise FatalError(f"{reason} (endpoint {s.base_url}, model {s.model})") from None
                if code not in RETRY_STATUS and code < 500:
                    self.usage.add(failed=1)
                    raise RequestFailed(reason) from None
                wait_s = self._backoff(attempt, retry_after_seconds(exc.response.headers))
            except oa.APIConnectionError as exc:  # includes APITimeoutError
                kind = "timeout" if isinstance(exc, oa.APITimeoutError) else "connection error"
                reason = self.redact(f"{kind}: {exc}")[:500]
                wait_s = self._backoff(attempt, None)
            if attempt >= s.max_retries:
                self.usage.add(failed=1)
                raise RequestFailed(f"gave up after {attempt + 1} attempts; last: {reason}")
            log.debug("retry %d in %.2fs after %s", attempt + 1, wait_s, reason)
            self.usage.add(retries=1)
            self._sleep(wait_s)
            attempt += 1
        done = dataclasses.replace(completion_from_body(resp.model_dump()), attempts=attempt + 1)
        self.usage.add(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)
        return done
