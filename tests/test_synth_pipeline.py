"""End-to-end synthetic data against a faulty HTTP stub with the real ``openai`` client:
brainstorm -> generate -> training JSONL for all six families, read back by the trainer's reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synth_stub import StubLLM, default_faults, no_faults

from conretriever.cli import main as cli_main
from conretriever.synth import generate, prompts
from conretriever.synth.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def fast_flags(url: str) -> list[str]:
    # Tiny backoffs keep the injected faults cheap. The 3 s timeout survives a loaded CI machine
    # (0.4 s flaked: slow normal replies were retried); the stub's "timeout" fault sleeps 4 s.
    return ["--base-url", url, "--model", "stub", "--backoff-base", "0.01", "--backoff-max",
            "0.05", "--timeout", "3.0", "--concurrency", "4"]  # fmt: skip


def planned_ids(out: Path, per_task: int) -> set[str]:
    tasks = generate.load_tasks(out / "tasks.jsonl", prompts.FAMILIES)
    settings = generate.GenerateJob(out_dir=out, examples_per_task=per_task)
    return {job["id"] for job in generate.plan_requests(tasks, settings)}


def test_full_run_every_family_survives_faults(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # local endpoint: dummy key
    out = tmp_path / "synth"
    with StubLLM(default_faults, timeout_sleep=0.8) as stub:
        flags = fast_flags(stub.base_url)
        bs_args = ["--out-dir", str(out), "--requests-per-family", "3", "--tasks-per-request", "3"]
        assert cli_main(["brainstorm", *bs_args, *flags]) == 0
        gen_args = ["--out-dir", str(out), "--examples-per-task", "2", *flags]
        assert cli_main(["generate", *gen_args]) == 0
        attempts_after_first_run = sum(stub.attempts.values())
        first_training_file = (out / "train" / "synthetic.jsonl").read_bytes()
        # A rerun of the finished command sends nothing and rewrites the same training file.
        assert cli_main(["generate", *gen_args]) == 0
        assert sum(stub.attempts.values()) == attempts_after_first_run

    # Every fault kind was actually injected.
    for kind in ("429", "500", "timeout", "malformed", "truncated", "fenced"):
        assert stub.faults_seen[kind] > 0, kind

    # Step 1: every family has tasks; the task every reply repeats is kept once per family.
    tasks = read_jsonl(out / "tasks.jsonl")
    by_family = {f: [t for t in tasks if t["family"] == f] for f in prompts.FAMILIES}
    assert all(by_family.values()), {f: len(v) for f, v in by_family.items()}
    for family in prompts.BRAINSTORMED:
        shared = [t for t in by_family[family] if "shared duplicate" in t["task"]]
        assert len(shared) == 1

    # Step 2: every request ends exactly once, as a record or as a final reject; none failed.
    records = read_jsonl(out / "examples.jsonl")
    rejects = read_jsonl(out / "examples.rejects.jsonl")
    record_ids = [r["id"] for r in records]
    reject_ids = [r["id"] for r in rejects]
    assert len(record_ids) == len(set(record_ids))
    assert set(record_ids).isdisjoint(reject_ids) and len(reject_ids) == len(set(reject_ids))
    assert set(record_ids) | set(reject_ids) == planned_ids(out, 2)
    assert all(r["final"] for r in rejects)
    bad = [k for k, v in stub.served.items() if v in ("malformed", "truncated")]
    bs_rejects = read_jsonl(out / "brainstorm.rejects.jsonl")
    assert len(rejects) + len(bs_rejects) == len(bad) > 0
    truncated = [r for r in rejects if r["finish_reason"] == "length"]
    assert truncated and all(r["reason"].startswith("truncated reply") for r in truncated)

    # Training file: every good reply once, nothing else, and it did not change on the rerun.
    train = out / "train" / "synthetic.jsonl"
    assert train.read_bytes() == first_training_file
    assert sorted(p.name for p in train.parent.iterdir()) == ["synthetic.jsonl"]
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    queries = [r["query"] for r in rows]
    assert len(queries) == len(set(queries)) and set(queries) == stub.good_queries
    for row in rows:
        assert set(row) == {"query", "positive", "negative", "instruction"}
        assert len(row["positive"]) == 1 and len(row["negative"]) == 1
    instructions = {r["instruction"] for r in rows}
    assert "Retrieve semantically similar text." in instructions
    assert any(i.startswith("Given a sentence in ") and "translation" in i for i in instructions)
    family_of = {t["task"]: t["family"] for t in tasks}
    assert {family_of[i] for i in instructions} == set(prompts.FAMILIES)

    usage = read_jsonl(out / "usage.jsonl")
    assert usage[-2]["stage"] == "examples" and usage[-2]["prompt_tokens"] > 0
    assert usage[-2]["retries"] > 0

    # The trainer's reader accepts the file as task "synthetic".
    data = pytest.importorskip("conretriever.data.training")
    from conretriever.data.tasks import TaskRegistry

    examples = data.read_task_file(train, registry=TaskRegistry())
    assert len(examples) == len(rows)
    assert {e.task for e in examples} == {"synthetic"}
    assert all(e.instruction and e.negatives for e in examples)


def test_duplicate_queries_are_dropped_in_conversion(tmp_path):
    def record(rid, family, task, fields):
        keys = prompts.FIELDS[family]
        return {"id": rid, "family": family, "task": task, "task_key": rid, "index": 0,
                "example": dict(zip(keys, fields, strict=True))}  # fmt: skip

    log = tmp_path / "examples.jsonl"
    rows = [
        record("b", "short-long", "Find docs.", ["What is RAG?", "doc 1", "neg 1"]),
        record("a", "short-long", "Find docs.", ["  what is  rag ", "doc 2", "neg 2"]),
        record("c", "sts", "Retrieve semantically similar text.", ["s1", "s2", "s3"]),
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        cli_main(
            ["convert-synthetic", "--examples", str(log), "--train-dir", str(tmp_path / "train")]
        )
        == 0
    )
    written = read_jsonl(tmp_path / "train" / "synthetic.jsonl")
    assert written[0]["positive"] == ["doc 2"]  # id order decides which duplicate is kept


def test_missing_key_for_remote_endpoint_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    remote = ["--base-url", "https://api.example.invalid/v1", "--out-dir", str(tmp_path)]
    assert (
        cli_main(["brainstorm", "--families", "sts", *remote]) == 0
    )  # fixed tasks: no LLM, no key
    assert cli_main(["generate", *remote]) == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY is not set" in err and "api.example.invalid" in err
    assert not (tmp_path / "examples.jsonl").exists()


def test_api_key_never_reaches_logs_or_files(tmp_path):
    key = "sk-LEAKCHECK-7f3a9c2e51d04b8e9a"

    def faults(k: str) -> str | None:  # some requests echo the key back in a 400 error
        return "echo_key" if int(k[:8], 16) % 3 == 0 else None

    env = {**os.environ, "OPENAI_API_KEY": key, "PYTHONPATH": str(REPO)}
    out = tmp_path / "synth"
    logs = []
    with StubLLM(faults) as stub:
        flags = [*fast_flags(stub.base_url), "--out-dir", str(out), "-v"]
        for cmd in (
            ["brainstorm", "--families", "short-long,sts,bitext", "--requests-per-family", "2"],
            ["generate", "--examples-per-task", "3"],
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "conretriever", *cmd, *flags],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            logs += [proc.stdout, proc.stderr]
    assert stub.tokens_seen == {key}  # the key was really sent ...
    echoed = [r for r in read_jsonl(out / "examples.rejects.jsonl") if "***" in r["reason"]]
    assert echoed, "no request got the key echoed back; the test would prove nothing"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 7
    for text in logs + [p.read_text(errors="replace") for p in files]:
        assert key not in text and key[3:15] not in text  # ... and never written anywhere


def test_failed_requests_are_retried_by_a_rerun(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "synth"
    args = ["--out-dir", str(out), "--examples-per-task", "3", "--max-retries", "1"]

    def outage(key: str) -> str | None:  # a third of the requests never get through
        return "always500" if int(key[:8], 16) % 3 == 0 else None

    with StubLLM(no_faults) as stub:
        assert cli_main(["brainstorm", "--families", "sts,bitext", "--out-dir", str(out)]) == 0
    with StubLLM(outage) as stub:
        assert cli_main(["generate", *args, *fast_flags(stub.base_url)]) == 0
    failed = {r["id"] for r in read_jsonl(out / "examples.rejects.jsonl") if not r["final"]}
    kept_first = {r["id"] for r in read_jsonl(out / "examples.jsonl")}
    assert failed and kept_first and failed.isdisjoint(kept_first)
    with StubLLM(no_faults) as stub:  # the endpoint is back (on another port: ids do not care)
        assert cli_main(["generate", *args, *fast_flags(stub.base_url)]) == 0
        assert sum(stub.attempts.values()) == len(failed)  # only the failed ones were asked
    kept = [r["id"] for r in read_jsonl(out / "examples.jsonl")]
    assert len(kept) == len(set(kept)) and set(kept) == kept_first | failed == planned_ids(out, 3)
    assert len(read_jsonl(out / "train" / "synthetic.jsonl")) == len(kept)
