"""Unit tests of the synthetic-data parts: JSON extraction, the record log, prompts, the client."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from synth_stub import StubLLM, no_faults

from conretriever.synth import prompts
from conretriever.synth.client import (
    ClientSettings,
    FatalError,
    LLMClient,
    RequestFailed,
    resolve_api_key,
    retry_after_seconds,
)
from conretriever.synth.parsing import ReplyParseError, extract_json
from conretriever.synth.store import AppendLog, StoreError, dedup_key, read_jsonl

# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": "x"}\n```', {"a": "x"}),
        ('Sure! Here: {"a": "brace } inside", "b": [1]} Enjoy.', {"a": "brace } inside", "b": [1]}),
        ('See [note] then ["t1", "t2"]', ["t1", "t2"]),
        ('{"doc": "para one\npara two"}', {"doc": "para one\npara two"}),  # raw newline
        ('prefix {"a": "quote \\" and { brace"} suffix', {"a": 'quote " and { brace'}),
    ],
)  # fmt: skip
def test_extract_json_recovers_wrapped_values(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", '{"a": "cut off', '{"a": 1, "b": [1, 2'])
def test_extract_json_rejects_malformed_and_truncated(text):
    with pytest.raises(ReplyParseError):
        extract_json(text)


# --- store -------------------------------------------------------------------------------------


def test_append_log_repairs_a_truncated_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog(path) as log:
        log.append({"id": "a"})
        log.append({"id": "b"})
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "half')  # what a SIGKILL mid-write could leave
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with AppendLog(path) as log:
        log.append({"id": "d"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "d"]
    assert path.read_bytes().endswith(b"\n")


def test_read_jsonl_names_file_and_line_of_a_corrupt_record(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(StoreError, match=r"log\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_normalize_text_merges_trivial_variants():
    assert dedup_key("  What is  RAG? ") == dedup_key("what is rag")
    assert dedup_key("what is rag") != dedup_key("what is a rag")


# --- prompts -----------------------------------------------------------------------------------


def test_every_family_has_seed_data_and_deterministic_prompts():
    for family in prompts.FAMILIES:
        data = prompts.load_seed_file(family)
        assert data["family"] == family
        tasks = (
            prompts.fixed_tasks(family)
            if family in ("sts", "bitext")
            else [prompts.Task(family, data["tasks"][0])]
        )
        a1 = prompts.sample_attributes(tasks[0], random.Random("id-1"), prompts.DEFAULT_LANGUAGES)
        a2 = prompts.sample_attributes(tasks[0], random.Random("id-1"), prompts.DEFAULT_LANGUAGES)
        assert a1 == a2 and "language" in a1 or family == "bitext"
        text = prompts.generate_messages(tasks[0], a1)[0]["content"]
        for field in prompts.FIELDS[family]:
            assert f'"{field}"' in text
    long_short = prompts.sample_attributes(
        prompts.Task("short-long", "t"), random.Random(3), prompts.DEFAULT_LANGUAGES
    )
    expected = {"language", "query_type", "query_length", "clarity", "num_words", "difficulty"}
    assert set(long_short) == expected


def test_importing_synth_pulls_in_neither_openai_nor_torch():
    code = (
        "import sys, conretriever.synth.generate, conretriever.synth.brainstorm;"
        "print(sorted(m for m in ('openai', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- client ------------------------------------------------------------------------------------


def test_api_key_rules(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(FatalError, match="OPENAI_API_KEY is not set"):
        resolve_api_key(ClientSettings(base_url="https://api.openai.com/v1"))
    assert resolve_api_key(ClientSettings(base_url="http://localhost:8000/v1"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real")
    assert resolve_api_key(ClientSettings(base_url="https://api.openai.com/v1")) == "sk-real"


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds({"retry-after": date}) <= 30
    assert retry_after_seconds({}) is None


def fast_settings(url: str, **kw) -> ClientSettings:
    base = dict(base_url=url, model="stub", backoff_base=0.01, backoff_max=0.05, timeout=0.5)
    return ClientSettings(**{**base, **kw})


MESSAGES = [{"role": "user", "content": 'Write S1. keys "S1"'}]


def test_client_honours_retry_after_and_recovers(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    waits = []
    with StubLLM(lambda key: "429", retry_after="3") as stub:
        client = LLMClient(fast_settings(stub.base_url), sleep=waits.append)
        done = client.chat(MESSAGES, seed=1)
    assert json.loads(done.text)["S1"].startswith("sentence one")
    assert done.attempts == 2 and client.usage.retries == 1
    assert 3.0 <= waits[0] <= 3.3  # the server's 3 s (plus <=10% jitter), not our 0.01 s backoff


def test_client_backs_off_exponentially_then_gives_up(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    waits = []
    with StubLLM(lambda key: "always500") as stub:
        s = fast_settings(stub.base_url, backoff_base=1.0, backoff_max=4.0, max_retries=4)
        client = LLMClient(s, sleep=waits.append)
        with pytest.raises(RequestFailed, match="gave up after 5 attempts; last: HTTP 500"):
            client.chat(MESSAGES)
    caps = [1, 2, 4, 4]  # d = min(backoff_max, base * 2**k); wait in [d/2, d]
    assert len(waits) == 4 and all(d / 2 <= w <= d for w, d in zip(waits, caps, strict=True))
    assert client.usage.failed == 1


def test_client_retries_a_timeout(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StubLLM(lambda key: "timeout", timeout_sleep=1.0) as stub:
        client = LLMClient(fast_settings(stub.base_url, timeout=0.3))
        done = client.chat(MESSAGES)
    assert done.attempts == 2 and stub.faults_seen["timeout"] == 1


def test_client_falls_back_when_json_mode_is_rejected(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StubLLM(no_faults, reject_json_mode=True) as stub:
        client = LLMClient(fast_settings(stub.base_url))
        for seed in range(3):
            assert "S1" in json.loads(client.chat(MESSAGES, seed=seed).text)
    assert stub.json_mode_requests == 1  # asked once, then the run goes on without it
    assert stub.plain_requests == 3


def test_client_stops_the_run_on_a_bad_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")

    with StubLLM(no_faults) as stub:
        denied = {"error": {"message": "bad key"}}
        stub.server.RequestHandlerClass.do_POST = lambda h: stub._send(h, 401, denied)
        client = LLMClient(fast_settings(stub.base_url))
        with pytest.raises(FatalError, match="HTTP 401"):
            client.chat(MESSAGES)
    assert client.usage.retries == 0  # a bad key is not retried


def test_schema_mode_sends_the_reply_schema(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    schema = prompts.reply_schema("sts")
    assert schema["required"] == ["S1", "S2", "S3"]
    with StubLLM(no_faults) as stub:
        LLMClient(fast_settings(stub.base_url, json_mode="schema")).chat(MESSAGES, schema=schema)
        LLMClient(fast_settings(stub.base_url)).chat(MESSAGES, schema=schema)
    assert stub.response_formats == [
        {"type": "json_object", "schema": schema},
        {"type": "json_object"},  # plain JSON mode never sends a schema
    ]
