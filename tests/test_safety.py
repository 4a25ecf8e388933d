"""No silent wrong results: run folders that cannot mix runs, code-free checkpoints, finite
training, strict inputs, outputs never overwritten by surprise, leftovers cleaned."""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conretriever.cli import main as cli
from conretriever.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "training_data" / "demo"


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model_name_or_path", str(model),
        "--train_data", str(DEMO),
        "--output_dir", str(out),
        "--query_max_length", "32",
        "--doc_max_length", "48",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"conretriever {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ----- 1. run folders ---------------------------------------------------------------------------
def test_a_second_run_is_refused_and_the_first_is_untouched(tiny_decoder, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(train_args(tiny_decoder, out, "--max_steps", "3", "--save_steps", "1")) == 0
    before = tree_bytes(out)
    assert cli(train_args(tiny_decoder, out, "--max_steps", "2", "--learning_rate", "5e-3")) == 2
    line = error_line(capsys, "train")
    assert str(out) in line and "holds another run" in line and "--overwrite_output_dir" in line
    assert tree_bytes(out) == before  # checkpoints, final/, metrics: all as they were
    old_id = json.loads((out / "run.json").read_text())["run_id"]
    args = train_args(tiny_decoder, out, "--max_steps", "2", "--overwrite_output_dir", "true")
    assert cli(args) == 0
    assert json.loads((out / "run.json").read_text())["run_id"] != old_id
    assert [r["step"] for r in rows(out)] == [1, 2]  # nothing of the old run mixed in
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints were removed


def test_a_run_that_fails_before_its_first_step_leaves_the_folder_free(tiny_decoder, tmp_path,
                                                                        capsys):  # fmt: skip
    """A wrong data path fails with one line; the same command with the path corrected then runs
    in the same folder (no --overwrite_output_dir), and a file already there is kept."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = train_args(tiny_decoder, out, "--max_steps", "1")
    bad = [tmp_path / "no_such_data" if a == str(DEMO) else a for a in args]
    assert cli([str(a) for a in bad]) == 2
    assert "no_such_data" in error_line(capsys, "train")
    assert not (out / "run.json").exists() and not (out / "config.yaml").exists()
    assert cli(args) == 0
    assert [r["step"] for r in rows(out)] == [1]
    assert (out / "notes.txt").read_text() == "mine"
    # a run that did train keeps its folder: the next command is refused, as before
    assert cli(args) == 2
    assert "holds another run" in error_line(capsys, "train")


def test_resume_refuses_a_changed_trajectory_and_force_applies_the_new_values(
    tiny_decoder, tmp_path, capsys
):
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "2")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    saved = (out / "config.yaml").read_text()
    changed = ("--learning_rate", "2e-3", "--temperature", "0.05")
    assert cli(train_args(tiny_decoder, out, *base, *changed, "--resume", "true")) == 2
    line = error_line(capsys, "train")
    assert "train.learning_rate: 0.001 -> 0.002" in line
    assert "loss.temperature: 0.02 -> 0.05" in line and "--resume force" in line
    assert (out / "config.yaml").read_text() == saved  # nothing rewritten by a refused run
    assert cli(train_args(tiny_decoder, out, *base, *changed, "--resume", "force")) == 0
    lr = {r["step"]: r["lr"] for r in rows(out)}
    # linear decay over 4 steps from the NEW peak: steps 3 and 4 use 2e-3 x 0.5 and x 0.25
    assert lr[3] == pytest.approx(1e-3) and lr[4] == pytest.approx(5e-4)
    assert lr[1] == pytest.approx(1e-3)  # the first run's rows (old peak 1e-3) are kept
    assert "learning_rate: 0.002" in (out / "config.yaml").read_text()


def test_resume_force_refuses_a_change_of_which_weights_the_checkpoint_holds(
    tiny_decoder, tmp_path, capsys
):
    """Fewer adapted layers would load a subset of the saved adapters and drop the rest
    silently; more would fail on a checkpoint that lacks them. Refused, even with force."""
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "2", "--lora_top_layers", "2")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    saved = (out / "config.yaml").read_text()
    assert cli(train_args(tiny_decoder, out, *base, "--lora_top_layers", "1",
                          "--resume", "force")) == 2  # fmt: skip
    line = error_line(capsys, "train")
    assert "--resume force cannot change" in line and "model.lora.top_layers: 2 -> 1" in line
    assert (out / "config.yaml").read_text() == saved


def test_resume_with_unchanged_settings_is_accepted(tiny_decoder, tmp_path):
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "2", "--logging_steps", "1")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    losses = [r["loss"] for r in rows(out)]
    # a run saved by a version before a setting existed lacks its key: it ran at the default
    saved = (out / "config.yaml").read_text()
    assert "  keep_layers: 0\n" in saved
    (out / "config.yaml").write_text(saved.replace("  keep_layers: 0\n", ""))
    # logging and saving cadence are not trajectory settings
    assert cli(train_args(tiny_decoder, out, *base[:4], "--logging_steps", "2",
                          "--resume", "true")) == 0  # fmt: skip
    assert [r["loss"] for r in rows(out)][:2] == losses[:2]


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tiny_decoder, tmp_path, caplog):
    out = tmp_path / "run"
    base = ("--max_steps", "6", "--save_steps", "2", "--save_total_limit", "3")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    reference = [r["loss"] for r in rows(out)]
    (out / "checkpoint-4" / "trainer_state.json").write_text("")  # torn by a crash
    (out / "checkpoint-5").mkdir()  # an empty folder
    with caplog.at_level(logging.INFO):
        assert cli(train_args(tiny_decoder, out, *base, "--resume", "true")) == 0
    text = caplog.text
    assert "checkpoint-4: cannot resume from it" in text
    assert "resumed from" in text and "checkpoint-2 at step 2" in text
    assert [r["loss"] for r in rows(out)] == reference  # exact: as if never interrupted


def test_rotation_and_resume_ignore_another_runs_checkpoint(tiny_decoder, tmp_path, caplog):
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "1", "--save_total_limit", "1")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    foreign = out / "checkpoint-99"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"step": 99, "run_id": "other"}))
    with caplog.at_level(logging.INFO):
        assert cli(train_args(tiny_decoder, out, *base, "--resume", "true")) == 0
    assert "checkpoint-99: cannot resume from it: written by another run" in caplog.text
    assert foreign.exists()  # rotation deleted only this run's checkpoints
    mine = [p.name for p in out.glob("checkpoint-*") if p != foreign]
    assert mine == ["checkpoint-3"]  # save_total_limit 1


def test_leftovers_of_a_killed_run_are_removed(tiny_decoder, tmp_path):
    out = tmp_path / "run"
    base = ("--max_steps", "2", "--save_steps", "1")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    (out / "checkpoint-7.tmp").mkdir()
    (out / "final.tmp").mkdir()
    assert cli(train_args(tiny_decoder, out, *base, "--resume", "true")) == 0
    assert not (out / "checkpoint-7.tmp").exists() and not (out / "final.tmp").exists()


def test_gguf_build_leftovers_only_of_dead_processes(tmp_path):
    from conretriever.model.specs import remove_dead_leftovers

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        (tmp_path / f"gguf-x.tmp-{dead}").mkdir()
        (tmp_path / f"gguf-x.tmp-{sleeper.pid}").mkdir()
        (tmp_path / f"model.gguf.tmp-{dead}").write_bytes(b"half a file")
        remove_dead_leftovers(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"gguf-x.tmp-{sleeper.pid}"]
    finally:
        sleeper.kill()


# ----- 2. nothing unsafe from disk --------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_pickles_do_not_run(tiny_decoder, tmp_path, caplog):
    out = tmp_path / "run"
    base = ("--max_steps", "4", "--save_steps", "2")
    assert cli(train_args(tiny_decoder, out, *base)) == 0
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    evil = out / "checkpoint-3"
    (evil / "state").mkdir(parents=True)
    (evil / "state" / ".metadata").write_bytes(payload)
    (evil / "rng_rank0.pt").write_bytes(payload)
    (evil / "trainer_state.json").write_text(
        json.dumps({"step": 3, "run_id": run_id, "world_size": 1, "scheduler": {}})
    )
    with caplog.at_level(logging.WARNING):
        assert cli(train_args(tiny_decoder, out, *base, "--resume", "true")) == 0
    assert not marker.exists()
    assert "checkpoint-3: cannot resume from it: state/.metadata unreadable" in caplog.text
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        checkpoint.safe_metadata(payload)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil / "rng_rank0.pt", weights_only=True)
    assert not marker.exists()


def test_real_checkpoint_metadata_reads_with_the_safe_unpickler(tiny_decoder, tmp_path):
    out = tmp_path / "run"
    assert cli(train_args(tiny_decoder, out, "--max_steps", "2", "--save_steps", "1")) == 0
    meta = checkpoint.safe_metadata((out / "checkpoint-1" / "state" / ".metadata").read_bytes())
    assert type(meta).__name__ == "Metadata" and meta.state_dict_metadata


# ----- 3. finite training -----------------------------------------------------------------------
def _nan_at(monkeypatch, step: int):
    """Make the loss NaN on the given (1-based) step; other steps unchanged."""
    import conretriever.training.loop as loop

    real, calls = loop.training_loss, []

    def loss(q, d, *args, **kwargs):
        out = real(q, d, *args, **kwargs)
        calls.append(1)
        if len(calls) == step:
            out.loss = out.loss * float("nan")
            out.backward_loss = out.backward_loss * float("nan")
        return out

    monkeypatch.setattr(loop, "training_loss", loss)


def test_a_nan_loss_stops_the_run_naming_the_step(tiny_decoder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_at(monkeypatch, 3)
    args = train_args(tiny_decoder, out, "--max_steps", "5", "--save_steps", "1",
                      "--chunk_size", "0")  # fmt: skip
    assert cli(args) == 2
    line = error_line(capsys, "train")
    assert "step 3: loss nan" in line and "not finite" in line and "checkpoint-2" in line
    assert not (out / "final").exists()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    metrics = rows(out)  # every line parses as strict JSON (NaN written as null)
    assert metrics[-1]["step"] == 3 and metrics[-1]["loss"] is None and metrics[-1]["skipped"]


def test_max_bad_steps_skips_and_the_weights_stay_finite(tiny_decoder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    _nan_at(monkeypatch, 2)
    args = train_args(tiny_decoder, out, "--max_steps", "4", "--chunk_size", "2",
                      "--max_bad_steps", "1")  # fmt: skip
    assert cli(args) == 0
    assert [r.get("skipped", False) for r in rows(out)] == [False, True, False, False]
    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# ----- 5./6. strict inputs ----------------------------------------------------------------------
def _task_file(folder: Path, rows_: list[dict], name: str = "nq.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return folder


def test_an_unknown_row_key_is_named_with_the_closest_known_key(tiny_decoder, tmp_path, capsys):
    rows_ = [{"query": "q", "positive": ["p"], "negatives": ["n"]}] * 8
    data = _task_file(tmp_path / "data", rows_)
    args = train_args(tiny_decoder, tmp_path / "run", "--max_steps", "1")
    args[args.index("--train_data") + 1] = str(data)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("conretriever train: error: 8 problems in training data")
    assert f"{data / 'nq.jsonl'}:1: field 'negatives': unknown key (did you mean 'negative'?)" in (
        err
    )
    assert "Traceback" not in err


def test_allow_extra_fields_accepts_and_counts(tiny_decoder, tmp_path, caplog):
    rows_ = [{"query": f"q{i}", "positive": [f"p{i}"], "id": i} for i in range(8)]
    data = _task_file(tmp_path / "data", rows_)
    args = train_args(tiny_decoder, tmp_path / "run", "--max_steps", "1",
                      "--allow_extra_fields", "true")  # fmt: skip
    args[args.index("--train_data") + 1] = str(data)
    with caplog.at_level(logging.WARNING):
        assert cli(args) == 0
    assert "8 row(s) carry keys the trainer ignores (id)" in caplog.text


def _beir(folder: Path, corpus: str, queries: str, qrels: str) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(corpus)
    (folder / "queries.jsonl").write_text(queries)
    (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


DOC = '{"_id": "d1", "text": "a document"}\n{"_id": "d2", "text": "another one"}\n'
QUERY = '{"_id": "q1", "text": "a question"}\n'


@pytest.mark.parametrize(
    ("corpus", "queries", "qrels", "message"),
    [
        ("", QUERY, "q1\td1\t1\n", "corpus.jsonl: no documents (the file is empty)"),
        (DOC, "", "q1\td1\t1\n", "queries.jsonl: no querys"),
        (DOC + '{"_id": "d1", "text": "other"}\n', QUERY, "q1\td1\t1\n",
         "corpus.jsonl:3: field '_id': document 'd1' appears twice with different texts"),
        (DOC, QUERY, "q1\td1\t1\nq9\td2\t1\n", "1 judged query id(s) have no text"),
        (DOC, QUERY, "", "qrels/test.tsv: no judgements"),
    ],
)  # fmt: skip
def test_strict_evaluation_folders(tmp_path, capsys, corpus, queries, qrels, message):
    folder = _beir(tmp_path / "beir", corpus, queries, qrels)
    assert cli(["eval", "--model", "unused", "--beir_dir", str(folder)]) == 2
    assert message in error_line(capsys, "eval")


def test_qrels_naming_missing_documents_warn_with_the_count(tmp_path, caplog):
    from conretriever.data.beir import load_beir_dir

    folder = _beir(tmp_path / "beir", DOC, QUERY, "q1\td1\t1\nq1\tgone\t1\nq1\tlost\t2\n")
    with caplog.at_level(logging.WARNING):
        data = load_beir_dir(folder)
    assert "2 judgement(s) name documents missing from the corpus" in caplog.text
    assert data.qrels == {"q1": {"d1": 1}}


# ----- 9. outputs never overwritten by surprise -------------------------------------------------
def test_writers_refuse_an_existing_output(tmp_path, capsys, tiny_encoder):
    rows_ = [{"query": "q", "positive": ["p"]}]
    src = tmp_path / "src.jsonl"
    src.write_text(json.dumps(rows_[0]) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "src.jsonl").write_text("precious\n")
    assert cli(["convert", "--dataset", str(src), "--out", str(out), "--no_progress"]) == 2
    assert "already exists; pass --overwrite" in error_line(capsys, "convert")
    assert (out / "src.jsonl").read_text() == "precious\n"
    assert cli(["convert", "--dataset", str(src), "--out", str(out), "--no_progress",
                "--overwrite"]) == 0  # fmt: skip
    assert (out / "src.jsonl").read_text() != "precious\n"

    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    vectors = tmp_path / "v.npy"
    vectors.write_bytes(b"keep")
    assert cli(["encode", "--model", str(tiny_encoder), "--input", str(texts),
                "--output", str(vectors)]) == 2  # fmt: skip
    assert "already exists" in error_line(capsys, "encode")
    assert vectors.read_bytes() == b"keep"
