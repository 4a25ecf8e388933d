"""Watching a run: evaluation during training leaves the trajectory untouched and scores like
``conretriever eval``; the best checkpoint survives rotation and can be exported; the saved
model carries a card; ``conretriever report`` draws the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conretriever.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
DEMO_EVAL = REPO / "eval_data" / "demo"


def args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model_name_or_path", str(model),
        "--train_data", str(REPO / "training_data" / "demo"),
        "--output_dir", str(out),
        "--query_max_length", "32",
        "--doc_max_length", "48",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--lora_dropout", "0.1",  # dropout on: the RNG must be restored around evaluation
        "--report_to", "none",
        "--seed", "5",
        *extra,
    ]  # fmt: skip


EVAL = ("--eval_data", str(DEMO_EVAL), "--eval_max_queries", "12", "--eval_max_docs", "40")


def rows(out: Path) -> tuple[list[dict], list[dict]]:
    all_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in all_rows if "loss" in r], [
        r for r in all_rows if "eval/average/ndcg_at_10" in r
    ]


def test_evaluation_during_training_changes_nothing_and_matches_conretriever_eval(
    tiny_decoder, tmp_path
):
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert cli(args(tiny_decoder, plain, "--max_steps", "4")) == 0
    assert cli(args(tiny_decoder, watched, "--max_steps", "4", *EVAL, "--eval_steps", "2")) == 0
    train_plain, _ = rows(plain)
    train_watched, evals = rows(watched)
    assert [r["loss"] for r in train_watched] == [r["loss"] for r in train_plain]  # bit-identical
    a, b = (
        load_file(str(plain / "final" / "model.safetensors")),
        load_file(str(watched / "final" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in evals] == [2, 4]
    # the score logged at the last step equals `conretriever eval` of the exported model on the
    # same subset (written out as a BEIR folder from the monitor's own subset)
    from conretriever.data.beir import load_beir_dir
    from conretriever.training.monitor import subset

    data = subset(load_beir_dir(DEMO_EVAL), 12, 40, seed=5)
    folder = tmp_path / "demo"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(data.corpus_ids, data.corpus_texts,
                                                                  strict=True)))  # fmt: skip
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in data.queries.items())
    )
    (folder / "qrels" / "test.tsv").write_text(
        "".join(f"{q}\t{d}\t{g}\n" for q, docs in data.qrels.items() for d, g in docs.items())
    )
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(watched / "final"), "--beir_dir", str(folder),
                "--output_dir", str(out), "--no_cache", "--dtype", "float32"]) == 0  # fmt: skip
    separate = json.loads((out / "demo.json").read_text())["metrics"]
    for key in ("ndcg_at_10", "recall_at_10", "mrr_at_10"):
        assert evals[-1][f"eval/demo/{key}"] == pytest.approx(separate[key], abs=1e-6)
    # the card of the saved folder lists both, and its YAML parses
    card = (watched / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "sentence-transformers"
    assert front["pipeline_tag"] == "sentence-similarity" and "conretriever" in front["tags"]
    assert "During training" in card and "`conretriever eval` of this folder" in card
    assert "| demo |" in card


def test_best_checkpoint_survives_rotation_and_is_exported(tiny_decoder, tmp_path, monkeypatch):
    import conretriever.training.monitor as monitor

    out = tmp_path / "run"
    scores = iter([0.30, 0.50, 0.40, 0.20])  # best at the 2nd evaluation (step 4)
    real = monitor.Monitor.evaluate

    def scripted(self, model, step):
        row = real(self, model, step)
        row["eval/average/ndcg_at_10"] = next(scores)
        return row

    monkeypatch.setattr(monitor.Monitor, "evaluate", scripted)
    extra = ("--max_steps", "8", "--save_steps", "2", "--save_total_limit", "1",
             "--eval_steps", "2", "--export", "best", *EVAL)  # fmt: skip
    assert cli(args(tiny_decoder, out, *extra)) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best"]["step"] == 4 and state["best"]["score"] == 0.5
    assert (out / "checkpoint-best").exists()  # kept although rotation keeps only checkpoint-6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-best"]
    # final/ holds the step-4 weights: the same as a run stopped at step 4
    short = tmp_path / "short"
    monkeypatch.setattr(monitor.Monitor, "evaluate", real)
    assert cli(args(tiny_decoder, short, "--max_steps", "8", "--save_steps", "4",
                    "--save_total_limit", "-1")) == 0  # fmt: skip
    best = load_file(str(out / "final" / "model.safetensors"))
    last = load_file(str(short / "final" / "model.safetensors"))
    assert any(not torch.equal(best[k], last[k]) for k in best)  # not the last weights
    from conretriever.model.embedder import Embedder
    from conretriever.training import checkpoint

    # the step-4 checkpoint of the uninterrupted run, exported the same way, equals final/
    lengths = {"query_max_length": 32, "doc_max_length": 48}
    lora = {"r": 16, "alpha": 32, "dropout": 0.1}
    ref = Embedder.from_pretrained(tiny_decoder, lengths, lora, device="cpu")
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    checkpoint.load(short / "checkpoint-4", ref, opt, sched)
    ref_dir = ref.save(tmp_path / "ref")
    want = load_file(str(ref_dir / "model.safetensors"))
    assert all(torch.equal(best[k], want[k]) for k in want)


def test_resume_keeps_the_best_record(tiny_decoder, tmp_path):
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", *EVAL)
    assert cli(args(tiny_decoder, out, *base)) == 0
    first = json.loads((out / "trainer_state.json").read_text())["best"]
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["best"]
    assert saved["step"] == 2  # the record as it was at that checkpoint
    assert cli(args(tiny_decoder, out, *base, "--resume", "true")) == 0
    assert json.loads((out / "trainer_state.json").read_text())["best"] == first


def test_sentence_transformers_loads_the_folder_with_its_card(tiny_decoder, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "run"
    assert cli(args(tiny_decoder, out, "--max_steps", "2", "--lora_dropout", "0")) == 0
    final = out / "final"
    assert (final / "README.md").exists()
    from conretriever.model.embedder import Embedder

    texts = ["a first text", "and a second one"]
    ours = Embedder.from_pretrained(final, device="cpu", dtype="float32").encode(texts, "passage")
    theirs = st.SentenceTransformer(str(final), device="cpu").encode(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_report_draws_the_runs(tiny_decoder, tmp_path):
    out = tmp_path / "run"
    assert cli(args(tiny_decoder, out, "--max_steps", "4", "--eval_steps", "2", *EVAL)) == 0
    assert cli(["report", str(out), "--out", str(tmp_path / "pics")]) == 0
    for name in ("training.png", "evaluation.png"):
        data = (tmp_path / "pics" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_two_process_fsdp_evaluation_equals_one_process(tiny_decoder, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    common = ("--max_steps", "2", "--eval_steps", "2", "--lora_dropout", "0", *EVAL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONRETRIEVER_CPU_BF16": "0"}
    run = [sys.executable, "-m", "conretriever"]
    one = args(tiny_decoder, single, "--per_device_train_batch_size", "8", *common)[1:]
    proc = subprocess.run([*run, "train", *one], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = args(tiny_decoder, sharded, "--per_device_train_batch_size", "4", *common)[1:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29700 + os.getpid() % 1000),
        "-m",
        "conretriever",
        "train",
    ]
    proc = subprocess.run([*torchrun, *two], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a,), (b,) = rows(single)[1], rows(sharded)[1]
    for key in a:
        if key.startswith("eval/"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
