"""Batch mode (OpenAI Batch API, offline batch files) against the stub's Files and Batches
endpoints: the same records as live mode, one submission per batch whatever is killed when,
follow-up batches for failed, expired and invalid lines, the dry run's numbers, and no key on
disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from synth_stub import StubLLM, no_faults

from conretriever.cli import main as cli_main
from conretriever.synth import batch as batch_mode
from conretriever.synth import brainstorm, generate
from conretriever.synth.run import ResumableRun
from conretriever.synth.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["short-long", "long-short"]
PER_TASK = 2


def reply_faults(key: str) -> str | None:
    """Bad replies only (no transient faults, which would change live mode's attempt counts)."""
    return {0: "malformed", 1: "fenced", 2: "truncated"}.get(int(key[:8], 16) % 9)


def flags(url: str, out: Path, *extra: str) -> list[str]:
    return ["--output", str(out), "--examples_per_task", str(PER_TASK), "--families", *FAMILIES,
            "--base_url", url, "--model", "stub", "--backoff_base", "0.01", "--backoff_max",
            "0.05", "--timeout", "3.0", "--concurrency", "2", "--poll_seconds", "0.02",
            *extra]  # fmt: skip


@pytest.fixture
def tasks_dir(tmp_path, monkeypatch) -> Path:
    """A run folder holding step 1's tasks (a few per family), made live against the stub."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "tasks"
    with StubLLM(no_faults) as stub:
        assert cli_main(["brainstorm", "--output", str(out), "--families", *FAMILIES,
                         "--requests_per_family", "2", "--tasks_per_request", "3",
                         "--base_url", stub.base_url, "--model", "stub"]) == 0  # fmt: skip
    return out


def fresh(tasks_dir: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    out.mkdir()
    shutil.copy(tasks_dir / "tasks.jsonl", out / "tasks.jsonl")
    return out


def planned(out: Path) -> set[str]:
    tasks = generate.load_tasks(out / "tasks.jsonl", tuple(FAMILIES))
    job = generate.GenerateJob(out_dir=out, examples_per_task=PER_TASK, families=tuple(FAMILIES))
    return {j["id"] for j in generate.plan_requests(tasks, job)}


def no_duplicates_nothing_lost(out: Path) -> list[dict]:
    records = read_jsonl(out / "examples.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a record written twice"
    assert set(ids) == planned(out), "a request lost"
    return records


def test_batch_mode_makes_the_records_live_mode_makes(tasks_dir, tmp_path):
    live, batch = fresh(tasks_dir, tmp_path, "live"), fresh(tasks_dir, tmp_path, "batch")
    with StubLLM(reply_faults) as stub:
        assert cli_main(["generate", *flags(stub.base_url, live)]) == 0
        assert cli_main(["generate", *flags(stub.base_url, batch, "--mode", "batch")]) == 0
        api = stub.batch_api
    by_id = lambda rows: {r["id"]: r for r in rows}  # noqa: E731
    assert by_id(read_jsonl(batch / "examples.jsonl")) == by_id(read_jsonl(live / "examples.jsonl"))
    # Bad replies: asked again in follow-up batches, final on the last try, as live's rejects.
    live_rejects = by_id(read_jsonl(live / "examples.rejects.jsonl"))
    batch_final = {r["id"]: {k: v for k, v in r.items() if k != "batch"}
                   for r in read_jsonl(batch / "examples.rejects.jsonl") if r["final"]}  # fmt: skip
    assert live_rejects and batch_final == live_rejects
    assert all(n == 1 + 2 for cid, n in api.lines_submitted.items() if cid in live_rejects)
    assert (batch / "train" / "synthetic.jsonl").read_bytes() == (
        live / "train" / "synthetic.jsonl"
    ).read_bytes()
    assert set(api.submissions.values()) == {1}  # every input file submitted once
    state = json.loads((batch / "examples.batches.json").read_text())
    assert {b["status"] for b in state["batches"]} == {"completed"}
    assert len(state["batches"]) == 3  # the first round and two follow-ups for the bad replies


def test_files_are_split_at_the_request_and_byte_limits(tasks_dir, tmp_path):
    out = fresh(tasks_dir, tmp_path, "split")
    with StubLLM(no_faults) as stub:
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch",
                                            "--max_requests_per_batch", "5")]) == 0  # fmt: skip
        assert set(stub.batch_api.submissions.values()) == {1}
    inputs = sorted((out / "batches").glob("*.input.jsonl"))
    sizes = [len(p.read_text().splitlines()) for p in inputs]
    assert max(sizes) == 5 and sum(sizes) == len(planned(out)) and len(inputs) >= 3
    no_duplicates_nothing_lost(out)
    lines = [{"custom_id": str(i), "body": {"x": "y" * 100}} for i in range(10)]
    size = len(json.dumps(lines[0], sort_keys=True)) + 1  # every line is as long: 141 bytes
    parts = batch_mode.split_lines(lines, max_requests=100, max_bytes=3 * size + 5)
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    assert [len(p) for p in batch_mode.split_lines(lines, 4, 10**6)] == [4, 4, 2]
    with pytest.raises(batch_mode.BatchError, match="request 0: .* over the 100-byte"):
        batch_mode.split_lines(lines, max_requests=100, max_bytes=100)


@pytest.mark.parametrize("point", ["upload", "create", "retrieve"])
def test_kill_9_then_rerun_submits_each_batch_once(tasks_dir, tmp_path, point):
    """SIGKILL while the upload is in flight (before upload), after the server accepted the batch
    but before the client heard back (after submit), and while polling; the rerun follows the
    batches the server already has."""
    out = fresh(tasks_dir, tmp_path, point)
    with StubLLM(no_faults) as stub:
        api = stub.batch_api
        api.polls_until_done = 2
        api.hold(point)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("OPENAI_API_KEY", None)
        cmd = [sys.executable, "-m", "conretriever", "generate",
               *flags(stub.base_url, out, "--mode", "batch")]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert api.arrived.wait(120), proc.stderr.read().decode()[-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            api.release()
        assert not (out / "examples.jsonl").exists()
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        assert list(api.submissions.values()) == [1] * len(api.submissions)
        assert set(api.lines_submitted.values()) == {1}  # no request paid twice
    no_duplicates_nothing_lost(out)


def test_crash_halfway_through_writing_results_writes_nothing_twice(tasks_dir, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """The run dies after writing some of a finished batch's records (simulated by a raise in
    the writer, at the same place a kill would land); the rerun writes only the rest."""
    out = fresh(tasks_dir, tmp_path, "feed")
    real = ResumableRun.record
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what a SIGINT would be; the records so far are on disk
        return real(self, *args, **kwargs)

    with StubLLM(no_faults) as stub:
        monkeypatch.setattr(ResumableRun, "record", dying)
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) != 0
        assert len(read_jsonl(out / "examples.jsonl")) == 3
        monkeypatch.setattr(ResumableRun, "record", real)
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        assert list(stub.batch_api.submissions.values()) == [1]
    no_duplicates_nothing_lost(out)


def test_error_file_lines_go_into_a_follow_up_batch(tasks_dir, tmp_path):
    out = fresh(tasks_dir, tmp_path, "errors")
    failing = set(sorted(planned(out))[::3])
    with StubLLM(no_faults) as stub:
        api = stub.batch_api
        api.fail_line = lambda cid, submission: cid in failing and submission == 1
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        assert {c for c, n in api.lines_submitted.items() if n == 2} == failing
        assert set(api.lines_submitted.values()) == {1, 2}
    no_duplicates_nothing_lost(out)
    rejects = read_jsonl(out / "examples.rejects.jsonl")
    assert {r["id"] for r in rejects} == failing and not any(r["final"] for r in rejects)


def test_an_expired_batch_keeps_its_results_and_resubmits_only_the_rest(tasks_dir, tmp_path):
    out = fresh(tasks_dir, tmp_path, "expired")
    with StubLLM(no_faults) as stub:
        api = stub.batch_api
        api.expire_next = 1
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        first, second = list(api.batches.values())
        answered = {x["custom_id"] for x in first["lines"][: len(first["lines"]) // 2]}
        assert first["status"] == "expired"
        assert {x["custom_id"] for x in second["lines"]} == planned(out) - answered
    no_duplicates_nothing_lost(out)


def test_a_batch_that_never_finishes_stops_with_the_state_to_resume(tasks_dir, tmp_path, capsys):
    out = fresh(tasks_dir, tmp_path, "slow")
    with StubLLM(no_faults) as stub:
        api = stub.batch_api
        api.never_finish = True
        wait = ["--mode", "batch", "--max_wait_hours", "0.0002"]  # 0.72 s
        assert cli_main(["generate", *flags(stub.base_url, out, *wait)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        assert "is still in_progress" in err[-1] and "examples.batches.json" in err[-1]
        assert "rerun the same command" in err[-1]
        api.never_finish = False
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        assert list(api.submissions.values()) == [1]
    no_duplicates_nothing_lost(out)


def test_dry_run_counts_match_a_hand_count_and_nothing_is_sent(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "dry"
    args = ["brainstorm", "--output", str(out), "--families", "short-long", "long-long",
            "--requests_per_family", "3", "--tasks_per_request", "5", "--mode", "batch",
            "--dry_run", "--price_per_1k_input", "0.15", "--price_per_1k_output", "0.6",
            "--max_tokens", "700", "--base_url", "http://127.0.0.1:9/v1"]  # fmt: skip
    assert cli_main(args) == 0  # port 9: nothing listens, so nothing can have been sent
    text = capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())
    # The hand count: the same requests, each message's content through the tokenizer.
    job = brainstorm.BrainstormJob(out_dir=out, families=("short-long", "long-long"),
                                   requests_per_family=3, tasks_per_request=5)  # fmt: skip
    jobs = brainstorm.plan_requests(job, 1.0)
    contents = [m["content"] for j in jobs for m in j["messages"]]
    from transformers import AutoTokenizer

    from conretriever.model.specs import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:minilm"))
    by_hand = sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 4 for c in contents)
    output = 6 * 700
    cost = 0.5 * (by_hand / 1000 * 0.15 + output / 1000 * 0.6)
    assert "6 requests to send (0 already answered), 1 batch file(s)" in text
    assert f"input tokens  ~{by_hand:,} " in text
    assert f"output tokens ~{output:,} (max_tokens x requests: an upper bound" in text
    assert f"cost          ~${cost:,.2f} " in text and "x 0.5 (batch price)" in text


def test_offline_mode_writes_files_for_vllm_and_reads_its_output_format(tasks_dir, tmp_path):
    """vLLM's ``run-batch`` reads the OpenAI batch input format and writes one line per request,
    ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
    (docs.vllm.ai, "Offline batched inference with the OpenAI batch file format")."""
    out = fresh(tasks_dir, tmp_path, "offline")
    assert cli_main(["generate", *flags("http://127.0.0.1:9/v1", out, "--mode", "offline")]) == 0
    inputs = sorted((out / "batches").glob("*.input.jsonl"))
    assert len(inputs) == 1 and not (out / "examples.jsonl").exists()
    with StubLLM(no_faults) as stub:  # stands in for the engine: the same replies as live
        for path in inputs:
            rows = []
            for raw in path.read_text().splitlines():
                line = json.loads(raw)
                assert set(line) == {"custom_id", "method", "url", "body"}
                assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
                assert {"model", "messages", "max_tokens", "seed"} <= set(line["body"])
                key = (
                    __import__("hashlib")
                    .sha1(
                        f"{line['body']['messages'][-1]['content']}|{line['body']['seed']}".encode()
                    )
                    .hexdigest()
                )
                rows.append({"id": f"vllm-{key[:8]}", "custom_id": line["custom_id"],
                             "response": {"status_code": 200, "request_id": f"vllm-batch-{key}",
                                          "body": stub._completion(line["body"], key, None)},
                             "error": None})  # fmt: skip
            out_path = Path(str(path).replace(".input.jsonl", ".output.jsonl"))
            out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["generate", *flags("http://127.0.0.1:9/v1", out, "--mode", "offline")]) == 0
    no_duplicates_nothing_lost(out)
    assert (out / "train" / "synthetic.jsonl").exists()


def test_the_key_is_in_no_file_and_the_state_holds_ids_only(tasks_dir, tmp_path, monkeypatch):
    secret = "sk-test-Very-Secret-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = fresh(tasks_dir, tmp_path, "key")
    with StubLLM(no_faults) as stub:
        assert cli_main(["generate", *flags(stub.base_url, out, "--mode", "batch")]) == 0
        assert stub.batch_api.tokens_seen == {secret}  # sent as the bearer token, and only there
    for path in out.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    state = json.loads((out / "examples.batches.json").read_text())
    allowed = {"name", "run", "round", "requests", "status", "file_id", "batch_id",
               "submitted_at", "downloaded", "fed"}  # fmt: skip
    assert all(set(b) <= allowed for b in state["batches"])


def test_batch_mode_refuses_a_local_model_in_one_line(tasks_dir, tmp_path, capsys):
    out = fresh(tasks_dir, tmp_path, "local")
    code = cli_main(["generate", *flags("embedded:gemma-3-270m", out, "--mode", "batch")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("conretriever generate: error: --mode batch needs an endpoint")


@pytest.mark.parametrize("mode", ["live", "batch"])
def test_max_requests_caps_a_run_and_the_next_run_sends_the_next(tasks_dir, tmp_path, mode):
    out = fresh(tasks_dir, tmp_path, mode)
    cap = ["--mode", mode, "--max_requests", "5"]
    with StubLLM(no_faults) as stub:
        assert cli_main(["generate", *flags(stub.base_url, out, *cap)]) == 0
        first = {r["id"] for r in read_jsonl(out / "examples.jsonl")}
        assert len(first) == 5
        assert cli_main(["generate", *flags(stub.base_url, out, *cap)]) == 0
        second = {r["id"] for r in read_jsonl(out / "examples.jsonl")} - first
        assert len(second) == 5
        sent = (
            sum(stub.attempts.values())
            if mode == "live"
            else sum(stub.batch_api.lines_submitted.values())
        )
        assert sent == 10  # nothing asked twice, nothing beyond the caps
