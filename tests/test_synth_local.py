"""The in-process local LLM server (``--base-url <model spec>``): the synthetic-data pipeline's
offline default. A tiny random decoder writes nonsense, but guided decoding must still give valid
JSON with the schema's keys, the real ``openai`` client must reach it over HTTP, and the
brainstorm -> generate -> training-JSONL run must produce rows the trainer reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import make_decoder_dir

from conretriever.cli import main as cli_main
from conretriever.data.tasks import TaskRegistry
from conretriever.data.training import load_training_data
from conretriever.synth import prompts
from conretriever.synth.client import ClientSettings, LLMClient, is_model_spec
from conretriever.synth.local_llm import LocalLLM, schema_from_response_format
from conretriever.synth.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "write one example as json"}]


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved WITH its LM head (so every load samples the same way)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = make_decoder_dir(tmp_path_factory.mktemp("tiny_llm"), arch="llama", seed=3)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llm(tiny_llm_dir) -> LocalLLM:
    return LocalLLM(str(tiny_llm_dir), device="cpu")


@pytest.mark.parametrize("family", ["short-long", "sts", None])
def test_guided_reply_is_valid_json_with_the_schema_keys(tiny_llm, family):
    schema = prompts.reply_schema(family)
    reply = tiny_llm.complete(MESSAGES, max_tokens=48, temperature=1.0, seed=7, schema=schema)
    value = json.loads(reply.text)
    assert list(value) == list(schema["properties"])
    for name, spec in schema["properties"].items():
        if spec["type"] == "string":
            assert isinstance(value[name], str)
        else:
            assert isinstance(value[name], list) and all(isinstance(v, str) for v in value[name])
    assert 0 < reply.completion_tokens <= 48 + 8  # the budget, plus at most a share rounding
    assert reply.prompt_tokens > 0


def test_seed_makes_a_reply_reproducible(tiny_llm):
    schema = prompts.reply_schema("short-short")
    first = tiny_llm.complete(MESSAGES, max_tokens=30, seed=11, schema=schema).text
    again = tiny_llm.complete(MESSAGES, max_tokens=30, seed=11, schema=schema).text
    other = tiny_llm.complete(MESSAGES, max_tokens=30, seed=12, schema=schema).text
    assert first == again
    assert first != other


def test_response_format_forms():
    schema = prompts.reply_schema("sts")
    assert (
        schema_from_response_format({"type": "json_object", "schema": schema}) == schema
    )  # llama.cpp
    openai_form = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert schema_from_response_format(openai_form) == schema
    assert schema_from_response_format({"type": "json_object"}) is None  # no schema: free sampling
    nested = {"type": "object", "properties": {"a": {"type": "object"}}}
    assert schema_from_response_format({"schema": nested}) is None  # not guidable: free sampling
    assert is_model_spec("embedded:gemma-3-270m") and is_model_spec("/models/x")
    assert not is_model_spec("http://127.0.0.1:8000/v1")


def test_openai_client_over_http_and_http_errors(tiny_llm_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = LLMClient(ClientSettings(base_url=str(tiny_llm_dir), json_mode="schema"))
    server = client.local_server
    assert server is not None and server.url.startswith("http://127.0.0.1:")
    done = client.chat(MESSAGES, max_tokens=24, seed=1, schema=prompts.reply_schema("bitext"))
    assert set(json.loads(done.text)) == {"S1", "S2", "S3"}
    assert server.requests_served == 1 and client.usage.completion_tokens == done.completion_tokens
    with urllib.request.urlopen(server.url + "/models", timeout=10) as resp:
        assert json.load(resp)["data"][0]["id"] == str(tiny_llm_dir)
    bad = urllib.request.Request(server.url + "/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "/nothing", timeout=10)
    assert err.value.code == 404
    server.shutdown()


def test_pipeline_on_a_local_model_spec(tiny_llm_dir, tmp_path, monkeypatch):
    """brainstorm -> generate -> synthetic.jsonl with ``--base-url <folder>``: no endpoint, no
    key, no network; the trainer's loader accepts the rows."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "synth"
    flags = ["--base-url", str(tiny_llm_dir), "--json-mode", "schema", "--concurrency", "1"]
    families = "short-long,sts"
    bs = ["--out-dir", str(out), "--families", families, "--requests-per-family", "1",
          "--tasks-per-request", "2", "--max-tokens", "40"]  # fmt: skip
    assert cli_main(["brainstorm", *bs, *flags]) == 0
    # A random model's task ideas may fail the content checks, but each reply is valid JSON.
    replies = read_jsonl(out / "brainstorm.jsonl") + read_jsonl(out / "brainstorm.rejects.jsonl")
    assert len(replies) == 1  # one short-long request (sts tasks are fixed, not brainstormed)
    assert all(isinstance(json.loads(r["reply"])["tasks"], list) for r in replies if "reply" in r)
    tasks = read_jsonl(out / "tasks.jsonl")
    assert "sts" in {t["family"] for t in tasks}
    gen = ["--out-dir", str(out), "--families", families, "--examples-per-task", "1",
           "--max-tokens", "48", "--languages", "English:1"]  # fmt: skip
    assert cli_main(["generate", *gen, *flags]) == 0
    examples = read_jsonl(out / "examples.jsonl")
    rejects = (
        read_jsonl(out / "examples.rejects.jsonl")
        if (out / "examples.rejects.jsonl").exists()
        else []
    )
    assert len(examples) + len(rejects) == len(tasks)
    assert not [r for r in rejects if "JSON" in r["reason"] or r["reason"].startswith("empty")]
    assert any(e["family"] == "sts" for e in examples)  # non-blank strings: a valid example
    rows = load_training_data(out / "train", TaskRegistry.load())
    assert sum(len(v) for v in rows.values()) == len(examples)


@pytest.mark.slow
def test_scripts_offline_default_with_the_embedded_gemma(tmp_path):
    """`bash scripts/brainstorm_task.sh` then `bash scripts/generate_examples.sh` with no
    arguments and no endpoint: the embedded Gemma-3-270M is served in-process."""
    env = {k: v for k, v in os.environ.items() if k not in ("BASE_URL", "OPENAI_API_KEY")}
    env.update(OUT_DIR=str(tmp_path / "synth"), PYTHON=sys.executable, FAMILIES="short-long")
    for script in ("brainstorm_task.sh", "generate_examples.sh"):
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = read_jsonl(tmp_path / "synth" / "train" / "synthetic.jsonl")
    assert rows and all(r["query"] and r["positive"] and r["instruction"] for r in rows)
