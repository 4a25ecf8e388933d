"""An in-process OpenAI-compatible chat server for any local decoder: the offline default LLM.

``--base-url embedded:gemma-3-270m`` (the scripts' default when ``BASE_URL`` is unset), or any
other model spec instead of an ``http(s)://`` URL, makes the synthetic-data client start this
server on a free loopback port and talk to it over real HTTP with the real ``openai`` client,
so the offline default runs exactly the code path a hosted endpoint does. ``conretriever
serve-llm --model SPEC --port 8000`` runs it on its own.

Endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions`` (messages, max_tokens,
temperature, seed, response_format; one request at a time: a lock serialises generation).

Decoding. A small base model rarely writes valid JSON by itself, so a request whose
``response_format`` carries a JSON schema (llama.cpp's ``{"type": "json_object", "schema": ...}``
or OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}``) of an object with string
or string-list properties is decoded *guided*: the server writes the JSON structure itself
(``{"key": "``) and lets the model write only the string values, each ending where the model
writes a double quote, a special token, or its share of ``max_tokens`` (never before the
schema's ``minLength``; a list gets at least ``minItems`` items). The reply is then valid
JSON by construction and the content is the model's. Other requests are sampled freely until an
end-of-turn token or ``max_tokens``. Sampling (transformers' logits processors, as ``generate``
applies them): a repetition penalty of 1.2 over the reply's tokens (base models loop without
one), temperature, nucleus top-p 0.95; ``seed`` makes a request reproducible. A 270M base model
writes poor text: this is for plumbing and offline demos, not for training data you care about.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from conretriever.options import opt

TOP_P = 0.95
REPETITION_PENALTY = 1.2


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def schema_from_response_format(response_format: dict | None) -> dict | None:
    """The JSON schema in an OpenAI or llama.cpp ``response_format``, if it is one we can guide:
    an object whose properties are strings or lists of strings."""
    if not isinstance(response_format, dict):
        return None
    schema = response_format.get("schema")
    if schema is None and isinstance(response_format.get("json_schema"), dict):
        schema = response_format["json_schema"].get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return None
    props = schema.get("properties") or {}
    for spec in props.values():
        kind = spec.get("type") if isinstance(spec, dict) else None
        items = spec.get("items", {}) if isinstance(spec, dict) else {}
        if kind != "string" and not (kind == "array" and items.get("type") == "string"):
            return None
    return schema if props else None


class LocalLLM:
    """A causal LM with a KV-cached sampling loop (see the module docstring)."""

    def __init__(self, spec: str, device: str | None = None):
        from transformers import AutoModelForCausalLM

        from conretriever.model.specs import resolve_model
        from conretriever.model.tokenizer_files import load_tokenizer

        path = resolve_model(spec)
        self.name = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        # transformers >= 5.2x calls the KV cache ``cache``; earlier 5.x ``past_key_values``
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        vocab = self.tokenizer.get_vocab()
        # Gemma's turn markers when the tokenizer has them and no chat template
        self._turns = "<start_of_turn>" in vocab and "<end_of_turn>" in vocab
        stops = {self.tokenizer.eos_token_id, vocab.get("<end_of_turn>")}
        self._stop_ids = {i for i in stops if i is not None}
        self._special = set(self.tokenizer.all_special_ids) | self._stop_ids

    # ----- prompt --------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            # Render to text, then tokenize: what apply_chat_template returns when it tokenizes
            # itself differs between transformers releases (a list or a BatchEncoding). The
            # template writes its own special tokens (BOS included).
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        if self._turns:
            text = "".join(
                f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n"
                f"{m['content']}<end_of_turn>\n"
                for m in messages
            )
            text += "<start_of_turn>model\n"
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return tok(text)["input_ids"]

    # ----- decoding ------------------------------------------------------------------------------
    @torch.no_grad()
    def complete(
        self,
        messages: list[dict],
        max_tokens: int = 256,
        temperature: float = 1.0,
        seed: int | None = None,
        schema: dict | None = None,
    ) -> Reply:
        gen = torch.Generator().manual_seed(seed if seed is not None else time.time_ns() % 2**63)
        state = _State(self, gen, temperature)
        prompt = self.prompt_ids(messages)
        state.feed(prompt)
        if schema is None:
            text, hit_limit = state.sample_text(max_tokens, stop_at_quote=False)
        else:
            text, hit_limit = self._guided(state, schema, max_tokens)
        return Reply(text, "length" if hit_limit else "stop", len(prompt), state.generated)

    def _guided(self, state: _State, schema: dict, max_tokens: int) -> tuple[str, bool]:
        props = schema["properties"]
        share = max(8, max_tokens // len(props))
        value: dict[str, str | list[str]] = {}
        hit_limit = False
        opener = "{"
        for name, spec in props.items():
            if spec["type"] == "string":
                state.feed_text(f'{opener}"{name}": "')
                least = max(1, int(spec.get("minLength", 1)))
                value[name], cut = state.sample_text(share, stop_at_quote=True, min_chars=least)
                hit_limit |= cut
                state.feed_text('"')
            else:  # a list of strings: items until the share is spent or the model closes it
                state.feed_text(f'{opener}"{name}": ["')
                items, budget = [], share
                least = max(1, int(spec["items"].get("minLength", 1)))
                min_items = int(spec.get("minItems", 1))
                while True:
                    start = state.generated
                    item, cut = state.sample_text(min(budget, 64), True, min_chars=least)
                    budget -= max(1, state.generated - start)
                    hit_limit |= cut and budget <= 0
                    if item.strip():
                        items.append(item)
                    state.feed_text('"')
                    more = len(items) < min_items or state.prefers(",", "]")
                    if budget <= 0 or len(items) >= 16 or not more:
                        break
                    state.feed_text(', "')
                value[name] = items
                state.feed_text("]")
            opener = ", "
        return json.dumps(value, ensure_ascii=False), hit_limit


class _State:
    """One reply being decoded: the KV cache, the sampler and the tokens generated so far."""

    def __init__(self, llm: LocalLLM, gen: torch.Generator, temperature: float):
        self.llm, self.gen, self.temperature = llm, gen, temperature
        self.cache = None
        self.logits: torch.Tensor | None = None  # next-token logits after everything fed
        self.history: list[int] = []  # reply tokens, for the repetition penalty
        self.generated = 0
        # transformers' own processors, in generate()'s order: penalty, temperature, top-p.
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        steps = [RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY)]
        if temperature > 0:
            steps += [TemperatureLogitsWarper(temperature), TopPLogitsWarper(TOP_P)]
        self.processors = LogitsProcessorList(steps)

    def feed(self, ids: list[int]) -> None:
        """Run ``ids`` through the model on top of the cache; keep the last position's logits
        (``logits_to_keep=1``: a 262k-token vocabulary head over a whole prompt would cost more
        than the rest of the model)."""
        out = self.llm.model(
            input_ids=torch.tensor([ids], device=self.llm.device),
            use_cache=True,
            logits_to_keep=1,
            **{self.llm.cache_kwarg: self.cache},
        )
        self.cache = getattr(out, self.llm.cache_kwarg)
        self.logits = out.logits[0, -1].float()

    def feed_text(self, text: str) -> None:
        ids = self.llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            self.feed(ids)
            self.history += ids

    def _sample(self, banned: set[int] = frozenset()) -> int:
        logits = self.logits.clone()
        if banned:
            logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
        history = torch.tensor([self.history], dtype=torch.long, device=logits.device)
        scores = self.processors(history.view(1, -1), logits[None])[0]
        if self.temperature <= 0:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1).cpu()  # top-p's cut tokens are -inf: 0 here
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def sample_text(self, budget: int, stop_at_quote: bool, min_chars: int = 1) -> tuple[str, bool]:
        """Sample up to ``budget`` tokens -> (text, whether the budget ran out). Stops before a
        special token and, with ``stop_at_quote``, at the first double quote (the text up to it
        is kept; the token holding it is not fed, so the caller writes the closing quote). A
        guided string may not end before it holds ``min_chars`` non-blank characters (the
        schema's ``minLength``): ending tokens are refused and the token resampled."""
        tok = self.llm.tokenizer
        ids: list[int] = []
        text = ""
        banned: set[int] = set()  # tokens refused while a guided string is still blank
        for _ in range(budget):
            token = self._sample(banned)
            candidate = tok.decode(ids + [token], skip_special_tokens=True)
            ends = token in self.llm._special or (stop_at_quote and '"' in candidate[len(text) :])
            short = len(text.strip()) < min_chars
            if ends and stop_at_quote and short and len(banned) < 64:
                banned.add(token)  # too short to end: sample again without this token
                continue
            if token in self.llm._special:
                return text, False
            if stop_at_quote and '"' in candidate[len(text) :]:
                return candidate[: candidate.index('"', len(text))], False
            ids.append(token)
            text = candidate
            self.generated += 1
            self.history.append(token)
            self.feed([token])
        return text, True

    def prefers(self, first: str, second: str) -> bool:
        """Is the next token more likely to start ``first`` than ``second``? (After a list
        item: ``,`` for another item or ``]`` for the end of the list.)"""
        tok = self.llm.tokenizer
        a = tok(first, add_special_tokens=False)["input_ids"][0]
        b = tok(second, add_special_tokens=False)["input_ids"][0]
        return bool(self.logits[a] >= self.logits[b])


# ----- HTTP ---------------------------------------------------------------------------------------
class LocalLLMServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` serving one :class:`LocalLLM`; ``url`` is its ``/v1`` base URL.
    Threads let ``/v1/models`` answer during a generation; the lock runs one generation at a
    time (one model, one KV cache per reply)."""

    daemon_threads = True

    def __init__(self, llm: LocalLLM, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.llm = llm
        self.lock = threading.Lock()
        self.requests_served = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: LocalLLMServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # one line per request on stderr would drown the run's own progress output

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.llm.name}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = body["messages"]
            if not messages or not all(isinstance(m.get("content"), str) for m in messages):
                raise ValueError("messages must be a non-empty list with string contents")
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
            temperature = float(body.get("temperature", 1.0))
            seed = body.get("seed")
            schema = schema_from_response_format(body.get("response_format"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._error(400, f"bad request: {exc}")
            return
        with self.server.lock:
            reply = self.server.llm.complete(messages, max_tokens, temperature, seed, schema)
            self.server.requests_served += 1
        self._send(
            200,
            {
                "id": f"chatcmpl-local-{self.server.requests_served}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.server.llm.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                },
            },
        )


def start_server(spec: str, host: str = "127.0.0.1", port: int = 0) -> LocalLLMServer:
    """Load ``spec`` and serve it from a daemon thread (port 0: a free port); returns at once
    after loading, so the load time never counts against a request's timeout."""
    server = LocalLLMServer(LocalLLM(spec), host, port)
    threading.Thread(target=server.serve_forever, name="local-llm", daemon=True).start()
    return server


@dataclass
class ServeSettings:
    """``conretriever serve-llm`` flags."""

    model: str = opt("embedded:gemma-3-270m", help="any model spec")
    host: str = opt("127.0.0.1", help="address to listen on (loopback: this machine only)")
    port: int = opt(8000, ge=0, le=65535, help="port (0: a free one)")


def run(command: ServeSettings) -> int:
    """``conretriever serve-llm``: serve a local model until interrupted."""
    server = LocalLLMServer(LocalLLM(command.model), command.host, command.port)
    print(f"serving {command.model} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
