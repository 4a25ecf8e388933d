"""A sweep of bad inputs across every command: each gets exit status 2 and ONE line,
``conretriever <command>: error: ...``, naming the flag, file, line or field, with no traceback.

``{w}`` in a case is the workspace folder the fixture fills with good and bad files; ``{dec}``
and ``{enc}`` are tiny random-init decoder/encoder folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conretriever.cli import main as cli

GOOD_ROW = {"query": "a question", "positive": ["a passage"], "negative": ["another"]}


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad_inputs")
    _jsonl(w / "good" / "nq.jsonl", [GOOD_ROW] * 16)
    _jsonl(w / "malformed" / "nq.jsonl", ['{"query": "a", '])
    _jsonl(w / "no_query" / "nq.jsonl", [{"positive": ["p"]}])
    _jsonl(w / "empty_positive" / "nq.jsonl", [{"query": "q", "positive": []}])
    _jsonl(w / "int_positive" / "nq.jsonl", [{"query": "q", "positive": 7}])
    _jsonl(w / "typo_key" / "nq.jsonl", [{**GOOD_ROW, "instrucion": "x"}])
    _jsonl(w / "unknown_task" / "mytask.jsonl", [GOOD_ROW])
    _jsonl(w / "tiny" / "nq.jsonl", [GOOD_ROW] * 3)
    (w / "bad.yaml").write_text("train: [unclosed\n")
    (w / "unknown.yaml").write_text("train:\n  learning_rte: 1e-4\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    beir = w / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": "d1", "text": "a document"}])
    _jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "a query"}])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tmaybe\n")
    (w / "texts.txt").write_text("one\ntwo\n")
    (w / "synth").mkdir()
    return w


CASES = [
    # train: every knob validated up front
    ("train", ["--learning_rate", "-1"], "--learning_rate: must be > 0, got -1.0"),
    ("train", ["--learning_rate", "nan"], "--learning_rate: must be a finite number"),
    ("train", ["--temperature", "0"], "--temperature: must be > 0, got 0.0"),
    ("train", ["--temperature", "nan"], "--temperature: must be a finite number"),
    ("train", ["--max_grad_norm", "nan"], "--max_grad_norm: must be a finite number"),
    ("train", ["--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size: must be >= 1"),
    ("train", ["--save_total_limit", "0"], "or -1 to keep every checkpoint, got 0"),
    ("train", ["--save_total_limit", "-2"], "--save_total_limit: must be >= -1"),
    ("train", ["--logging_steps", "0"], "--logging_steps: must be >= 1, got 0"),
    ("train", ["--num_train_epochs", "0"], "--num_train_epochs: must be > 0"),
    ("train", ["--max_steps", "0"], "--max_steps: 0 would train nothing"),
    ("train", ["--report_to", "wandb"], "'wandb' is not allowed; use one of tensorboard, none"),
    ("train", ["--dtype", "float8"], "--dtype: 'float8' is not allowed"),
    ("train", ["--mixed_precision", "fp16"], "--mixed_precision: 'fp16' is not allowed"),
    ("train", ["--lr_scheduler", "step"], "--lr_scheduler: 'step' is not allowed"),
    ("train", ["--query_max_length", "0"], "--query_max_length: must be >= 1, got 0"),
    ("train", ["--pooling", "max"], "--pooling: 'max' is not allowed; use one of last, mean, cls"),
    ("train", ["--lora_dropout", "1.5"], "--lora_dropout: must be <= 0.9"),
    ("train", ["--lora_r", "0"], "--lora_r: must be >= 1"),
    ("train", ["--use_lora", "maybe"], "--use_lora: expected true or false, got 'maybe'"),
    ("train", ["--resume", "maybe"], "'maybe' is not allowed; use one of false, true, force"),
    ("train", ["--chunk_size", "-1"], "--chunk_size: must be >= 0"),
    ("train", ["--n_hard_negative", "-1"], "--n_hard_negative: must be >= 0"),
    ("train", ["--learning_rat", "1e-4"], "(did you mean '--learning_rate'?)"),
    ("train", ["--config", "{w}/missing.yaml"], "missing.yaml: cannot read config"),
    ("train", ["--config", "{w}/bad.yaml"], "bad.yaml:2: not valid YAML"),
    ("train", ["--config", "{w}/unknown.yaml"],
     "unknown.yaml: train.learning_rte: unknown key (did you mean 'learning_rate'?)"),
    ("train", ["--config", "{w}/list.yaml"], "the top level must be a mapping"),
    ("train", ["--train_data", "{w}/nowhere"], "nowhere: training data not found"),
    ("train", ["--train_data", "{w}/malformed"], "malformed/nq.jsonl:1: malformed JSON"),
    ("train", ["--train_data", "{w}/no_query"], "no_query/nq.jsonl:1: field 'query': missing"),
    ("train", ["--train_data", "{w}/empty_positive"], "nq.jsonl:1: field 'positive': empty"),
    ("train", ["--train_data", "{w}/int_positive"],
     "field 'positive': expected a string or a list of strings"),
    ("train", ["--train_data", "{w}/typo_key"],
     "field 'instrucion': unknown key (did you mean 'instruction'?)"),
    ("train", ["--train_data", "{w}/unknown_task"],
     "field 'instruction': missing, and task 'mytask' has no registry entry"),
    ("train", ["--train_data", "{w}/tiny"], "no full batch of 4 rows can be formed"),
    ("train", ["--model_name_or_path", "/nonexistent/model"], "model path not found"),
    ("train", ["--model_name_or_path", "embedded:nope"], "unknown embedded model 'embedded:nope'"),
    ("train", ["--model_name_or_path", "{enc}", "--packed", "true"],
     "--packed true needs a decoder"),
    # eval
    ("eval", ["--beir_dir", "{w}/beir"], "--model is required"),
    ("eval", ["--model", "x"], "give --tasks and/or --beir_dir"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/nowhere"], "nowhere: not a directory"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir", "--batch_size", "0"],
     "--batch_size: must be >= 1"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir", "--engine", "faiss"],
     "--engine: 'faiss' is not allowed; use one of native, mteb"),
    ("eval", ["--model", "x", "--beir_dir", "{w}/beir"],
     "beir/qrels/test.tsv:2: malformed qrels line"),
    # mine
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--window", "0-3"],
     "--window: '0-3' needs 1 <= LO <= HI"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--window", "ab"],
     "--window: 'ab' is not LO-HI"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c"], "--out is required"),
    ("mine", ["--model", "x", "--data", "d", "--corpus", "c", "--out", "o", "--pick", "best"],
     "--pick: 'best' is not allowed; use one of random, top"),
    ("mine", ["--model", "x", "--data", "{w}/good/nq.jsonl", "--corpus", "{w}/nowhere",
              "--out", "{w}/mined.jsonl"], "nowhere: corpus not found"),
    # convert
    ("convert", ["--dataset", "x.jsonl"], "--dataset and --out are both needed"),
    ("convert", ["--dataset", "x", "--out", "o", "--layout", "weird"],
     "--layout: 'weird' is not allowed"),
    ("convert", ["--dataset", "{w}/malformed/nq.jsonl", "--out", "{w}/conv", "--no_progress"],
     "malformed/nq.jsonl:1: malformed JSON"),
    ("convert", ["--dataset", "{w}/nowhere.jsonl", "--out", "{w}/conv"],
     "nowhere.jsonl: no such file or folder"),
    # decontaminate
    ("decontaminate", ["--data", "{w}/good"], "--eval_dirs is required"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--drop"],
     "--drop needs --out"),
    ("decontaminate", ["--data", "{w}/good", "--eval_dir", "{w}/beir", "--fields", "title"],
     "--fields: 'title' is not allowed; use one of query, positive, negative"),
    # encode
    ("encode", ["--model", "x", "--input", "{w}/none.txt", "--output", "{w}/v.npy"],
     "none.txt: cannot read"),
    ("encode", ["--model", "x", "--input", "{w}/texts.txt", "--output", "o", "--role", "doc"],
     "--role: 'doc' is not allowed; use one of query, passage"),
    # compare
    ("compare", ["{w}/nowhere"], "nowhere: no evaluation results"),
    # average
    ("average", ["{w}/good", "--output", "{w}/avg"], "give at least two model folders, got 1"),
    ("average", ["{w}/good", "{w}/beir", "--output", "{w}/avg"],
     "good: no model.safetensors (not a saved model folder)"),
    ("average", ["{w}/good", "{w}/beir", "--output", "{w}/avg", "--weights", "1"],
     "--weights: 1 weights for 2 model folders"),
    # train: the recipe's options
    ("train", ["--embed_distil_weight", "1"], "needs --embed_distil_model"),
    ("train", ["--bidirectional", "true"], "has no bidirectional attention option"),
    ("train", ["--distil_temperature", "0"], "--distil_temperature: must be > 0"),
    # synthetic data
    ("brainstorm", ["--families", "poetry"],
     "--families: 'poetry' is not allowed; use one of all, short-long"),
    ("brainstorm", ["--bitext_pairs", "English"], "expected SRC-TGT items"),
    ("brainstorm", ["--concurrency", "0"], "--concurrency: must be >= 1"),
    ("generate", ["--examples_per_task", "0"], "--examples_per_task: must be >= 1"),
    ("generate", ["--languages", "English:-1"], "weights > 0"),
    ("generate", ["--out_dir", "{w}/synth"],
     "tasks.jsonl: no task file; run `conretriever brainstorm`"),
    ("generate", ["--timeout", "0"], "--timeout: must be > 0"),
    ("serve-llm", ["--port", "70000"], "--port: must be <= 65535"),
]  # fmt: skip


def test_the_sweep_is_wide():
    assert len(CASES) >= 40
    assert len({c for c, _, _ in CASES}) >= 10  # every command but convert-synthetic's twin


@pytest.mark.parametrize(("command", "argv", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(workspace, tiny_decoder, tiny_encoder, tmp_path, capsys, monkeypatch,
                   command, argv, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    fill = {"w": workspace, "dec": tiny_decoder, "enc": tiny_encoder}
    argv = [a.format(**fill) for a in argv]
    if command == "train":  # a valid run around the one bad value
        base = [
            "--model_name_or_path",
            str(tiny_decoder),
            "--train_data",
            str(workspace / "good"),
            "--output_dir",
            str(tmp_path / "run"),
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "1",
            "--report_to",
            "none",
        ]
        argv = base + argv  # later flags win
    assert cli([command, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith(f"conretriever {command}: error: ")]
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
