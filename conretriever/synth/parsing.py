"""Pull one JSON value out of an LLM reply.

Endpoints that honour JSON mode return a bare object, but many servers (and JSON-mode fallbacks)
wrap it in a Markdown code fence or chatter around it ("Sure! Here is ..."). The recovery is:

1. strip a surrounding code fence (```json ... ```);
2. try the whole text as JSON;
3. otherwise scan for the first ``{`` or ``[`` and take the balanced span that closes it, tracking
   strings and escapes so that braces inside string values do not count.

Parsing is non-strict about control characters: models often put raw newlines inside long
string values (documents with paragraphs), which strict JSON forbids but which are harmless.

A reply that is cut off (``finish_reason == "length"``) usually has no balanced span; it then
fails here with a reason that says so, and the caller writes it to the rejects file.
"""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


class ReplyParseError(ValueError):
    """The reply holds no usable JSON value; the message is the reject reason."""


def _balanced_span(text: str, start: int) -> str | None:
    """The substring from ``text[start]`` (an opening bracket) to its matching close."""
    closing = {"{": "}", "[": "]"}
    stack: list[str] = []
    in_string = escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in closing:
            stack.append(closing[ch])
        elif ch in "}]":
            if not stack or ch != stack.pop():
                return None  # mismatched bracket: not a JSON value
            if not stack:
                return text[start : i + 1]
    return None


def extract_json(text: str) -> object:
    """The first JSON object or array in ``text``; raises ReplyParseError with a reason."""
    if not text or not text.strip():
        raise ReplyParseError("empty reply")
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text
    try:
        return json.loads(body, strict=False)
    except json.JSONDecodeError:
        pass
    for match in re.finditer(r"[{\[]", body):
        span = _balanced_span(body, match.start())
        if span is None:
            continue
        try:
            return json.loads(span, strict=False)
        except json.JSONDecodeError:
            continue  # e.g. "[citation]" in prose before the real object
    raise ReplyParseError("no complete JSON object or array in reply (malformed or truncated)")
