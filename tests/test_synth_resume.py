"""Kill the generator with SIGKILL mid-run, rerun the same command: the final training file must be
byte-identical to an uninterrupted run's, with no request answered twice and none missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from synth_stub import StubLLM, default_faults, no_faults

from conretriever.cli import main as cli_main
from conretriever.synth import generate, prompts
from conretriever.synth.store import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PER_TASK = 2


def flags(url: str, out: Path) -> list[str]:
    return ["--out-dir", str(out), "--examples-per-task", str(PER_TASK), "--base-url", url,
            "--model", "stub", "--backoff-base", "0.01", "--backoff-max", "0.05",
            "--timeout", "3.0", "--concurrency", "2"]  # fmt: skip


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    with StubLLM(no_faults) as stub:  # step 1 is not under test here: every family gets tasks
        bs = ["--out-dir", str(ref), "--requests-per-family", "1", "--tasks-per-request", "2",
              "--base-url", stub.base_url, "--model", "stub"]  # fmt: skip
        assert cli_main(["brainstorm", *bs]) == 0
    with StubLLM(default_faults, timeout_sleep=0.8) as stub:
        killed.mkdir()
        shutil.copy(ref / "tasks.jsonl", killed / "tasks.jsonl")
        assert (
            cli_main(["generate", *flags(stub.base_url, ref)]) == 0
        )  # the uninterrupted reference
    tasks = generate.load_tasks(ref / "tasks.jsonl", prompts.FAMILIES)
    total = len(tasks) * PER_TASK
    assert {t.family for t in tasks} == set(prompts.FAMILIES) and total >= 20

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPENAI_API_KEY", None)
    log = killed / "examples.jsonl"
    with StubLLM(default_faults, timeout_sleep=0.8, delay=0.2) as slow:  # ~0.1 s per request
        cmd = [sys.executable, "-m", "conretriever", "generate", *flags(slow.base_url, killed)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while count_lines(log) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        done_before = count_lines(log) + count_lines(killed / "examples.rejects.jsonl")
        assert 5 <= done_before < total, "the kill did not land mid-run"
        assert not (killed / "train" / "synthetic.jsonl").exists()

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{total} requests: {done_before} already done" in rerun.stderr

    records = read_jsonl(log)
    rejects = read_jsonl(killed / "examples.rejects.jsonl")
    ids = [r["id"] for r in records] + [r["id"] for r in rejects if r["final"]]
    assert len(ids) == len(set(ids)) == total  # nothing twice, nothing missing
    expected = (ref / "train" / "synthetic.jsonl").read_bytes()
    assert (killed / "train" / "synthetic.jsonl").read_bytes() == expected
    assert len(expected.splitlines()) == len(records) > 0
