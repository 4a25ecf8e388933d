"""hf_to_training_data / conretriever.data.convert on small local files in every supported
layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conretriever.cli import main as cli_main
from conretriever.data.tasks import TaskRegistry, eval_instruction
from conretriever.data.training import load_training_data, read_task_file

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(*args) -> int:
    return cli_main(["convert", *map(str, args), "--no-progress"])


def test_e5r_collection_all_configs(tmp_path):
    """A local copy of the E5-R layout: one sub-folder (or file) per config, hub-style names."""
    import pandas as pd

    src = tmp_path / "e5r"
    (src / "nq").mkdir(parents=True)
    pd.DataFrame(
        {
            "query": ["who wrote hamlet", "capital of peru"],
            "positive": [["Hamlet is a tragedy by Shakespeare."], ["Lima is the capital."]],
            "negative": [["Macbeth is a play.", "Othello is a play."], []],
        }
    ).to_parquet(src / "nq" / "train-00000-of-00001.parquet")
    synthetic = [
        {"query": f"q{i}", "positive": [f"p{i}"], "negative": [f"n{i}"], "instruction": f"do {i}"}
        for i in range(3)
    ]
    write_jsonl(src / "synthetic" / "train.jsonl", synthetic)
    write_jsonl(src / "fiqa.jsonl", [{"query": "is gold safe", "positive": "Gold is volatile."}])
    out = tmp_path / "out"
    assert run("--dataset", src, "--config", "all", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fiqa.jsonl", "nq.jsonl", "synthetic.jsonl"]
    nq = read_rows(out / "nq.jsonl")
    assert nq[0] == {
        "query": "who wrote hamlet",
        "positive": ["Hamlet is a tragedy by Shakespeare."],
        "negative": ["Macbeth is a play.", "Othello is a play."],
    }
    assert nq[1]["negative"] == []
    assert [r["instruction"] for r in read_rows(out / "synthetic.jsonl")] == [
        "do 0",
        "do 1",
        "do 2",
    ]
    assert read_rows(out / "fiqa.jsonl")[0]["positive"] == ["Gold is volatile."]
    data = load_training_data(out, TaskRegistry.load())  # the trainer's own loader accepts it
    assert {t: len(v) for t, v in data.items()} == {"fiqa": 1, "nq": 2, "synthetic": 3}


def test_csv_named_columns_keep_text_types(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text(
        "q,doc,hard,inst\n1984,A novel by Orwell.,,Find books\nwhat is 2+2,Four.,Five.,\n"
    )
    out = tmp_path / "out"
    args = ["--dataset", src, "--out", out, "--task", "books", "--query-column", "q"]
    args += ["--positive-column", "doc", "--negative-column", "hard"]
    assert run(*args, "--instruction-column", "inst") == 0
    rows = read_rows(out / "books.jsonl")
    # "1984" stays a string; an empty cell is no negative; an empty instruction is dropped.
    assert rows == [
        {
            "query": "1984",
            "positive": ["A novel by Orwell."],
            "negative": [],
            "instruction": "Find books",
        },
        {"query": "what is 2+2", "positive": ["Four."], "negative": ["Five."]},
    ]
    assert run("--dataset", src, "--out", out, "--query-column", "nope") == 2


def test_msmarco_triples_tsv_merges_consecutive_negatives(tmp_path):
    src = tmp_path / "triples.train.small.tsv"
    src.write_text("q1\tp1\tn1\nq1\tp1\tn2\nq2\tp2\tn3\nq1\tp1\tn4\n")
    out = tmp_path / "out"
    assert run("--dataset", src, "--out", out, "--task", "msmarco_passage") == 0
    rows = read_rows(out / "msmarco_passage.jsonl")
    assert [(r["query"], r["negative"]) for r in rows] == [
        ("q1", ["n1", "n2"]),
        ("q2", ["n3"]),
        ("q1", ["n4"]),  # only consecutive lines merge: streaming, no global grouping
    ]
    assert all("instruction" not in r for r in rows)  # msmarco_passage is in the registry


def test_tevatron_passage_dicts_and_aliases(tmp_path):
    rows = [
        {
            "query_id": "1",
            "question": "what is dna",
            "positive_passages": [{"docid": "7", "title": "DNA", "text": "A molecule."}],
            "negative_passages": [{"docid": "8", "title": "", "text": "RNA is different."}],
        }
    ]
    src = write_jsonl(tmp_path / "tev.jsonl", rows)
    assert run("--dataset", src, "--out", tmp_path / "o", "--instruction", "Find it") == 0
    assert read_rows(tmp_path / "o" / "tev.jsonl") == [
        {
            "query": "what is dna",
            "positive": ["DNA A molecule."],
            "negative": ["RNA is different."],
            "instruction": "Find it",
        }
    ]


def make_beir(folder: Path) -> Path:
    write_jsonl(
        folder / "corpus.jsonl",
        [
            {"_id": "d1", "title": "Title one", "text": "Body one."},
            {"_id": "d2", "title": "", "text": "Body two."},
            {"_id": "d3", "title": "T3", "text": "Body three."},
        ],
    )
    write_jsonl(
        folder / "queries.jsonl",
        [
            {"_id": "007", "text": "first query"},
            {"_id": "2", "text": "second"},
            {"_id": "3", "text": "no qrels"},
        ],
    )
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n007\td1\t1\n007\td2\t2\n007\td3\t0\n2\td3\t1\n"
    )
    return folder


def test_beir_folder(tmp_path):
    src = make_beir(tmp_path / "scifact")
    out = tmp_path / "out"
    assert run("--dataset", src, "--out", out) == 0
    rows = read_rows(out / "scifact.jsonl")
    # score 0 is not relevant; id "007" keeps its zeros; title + text joined by a space
    assert rows == [
        {
            "query": "first query",
            "positive": ["Title one Body one.", "Body two."],
            "negative": [],
            "instruction": eval_instruction("scifact"),
        },
        {
            "query": "second",
            "positive": ["T3 Body three."],
            "negative": [],
            "instruction": eval_instruction("scifact"),
        },
    ]
    (src / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n2\td9\t1\n")
    assert run("--dataset", src, "--out", tmp_path / "bad") == 2
    assert not (tmp_path / "bad" / "scifact.jsonl").exists()


def test_beir_scifact_train(tmp_path, shared_data):
    out = tmp_path / "out"
    assert run("--dataset", shared_data / "scifact", "--split", "train", "--out", out) == 0
    examples = read_task_file(out / "scifact.jsonl", registry=TaskRegistry.load())
    assert len(examples) == 809  # BEIR SciFact train queries
    assert sum(len(e.positives) for e in examples) == 919  # qrels/train.tsv pairs


def test_malformed_row_named_and_nothing_written(tmp_path, capsys):
    rows = [
        {"query": "ok", "positive": ["p"]},
        {"query": "ok2", "positive": ["p2"]},
        {"query": "  ", "positive": ["p3"]},
        {"query": "q4", "positive": []},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert run("--dataset", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{src}:3: field 'query': empty" in err
    assert f"{src}:4: field 'positive': empty" in err
    assert list(out.iterdir()) == []  # no task file, no temporary file
    src.write_text('{"query": "a", "positive": ["b"]}\n{"query": "a" "positive": 1}\n')
    assert run("--dataset", src, "--out", out) == 2
    assert f"{src}:2: malformed JSON" in capsys.readouterr().err


def test_failed_config_leaves_no_task_files(tmp_path):
    src = tmp_path / "coll"
    write_jsonl(src / "good.jsonl", [{"query": "a", "positive": ["b"]}])
    write_jsonl(src / "later.jsonl", [{"query": "a", "positive": None}])
    out = tmp_path / "out"
    assert run("--dataset", src, "--config", "all", "--out", out) == 2
    assert list(out.iterdir()) == []


def test_max_examples_shuffle_and_negative_subsets_follow_seed(tmp_path):
    rows = [
        {"query": f"q{i}", "positive": [f"p{i}"], "negative": [f"n{i}_{k}" for k in range(5)]}
        for i in range(50)
    ]
    src = write_jsonl(tmp_path / "nq.jsonl", rows)

    def convert(seed: int, name: str) -> list[dict]:
        args = ["--dataset", src, "--out", tmp_path / name, "--max-examples", 10]
        assert run(*args, "--shuffle-buffer", 20, "--max-negatives", 2, "--seed", seed) == 0
        return read_rows(tmp_path / name / "nq.jsonl")

    a, b, c = convert(1, "a"), convert(1, "b"), convert(2, "c")
    assert a == b and a != c
    assert len(a) == 10 and all(len(r["negative"]) == 2 for r in a)
    assert [r["query"] for r in a] != [f"q{i}" for i in range(10)]  # shuffled
    for r in a:
        assert set(r["negative"]) <= {f"{r['query'].replace('q', 'n')}_{k}" for k in range(5)}


def test_script_entry_point(tmp_path):
    src = write_jsonl(tmp_path / "fever.jsonl", [{"query": "c", "positive": ["e"]}])
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "hf_to_training_data.py"),
            "--dataset",
            str(src),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 rows (read 1)" in proc.stdout
    assert read_rows(out / "fever.jsonl") == [{"query": "c", "positive": ["e"], "negative": []}]


@pytest.mark.parametrize("layout", ["columns", "triples"])
def test_tsv_layout_flag(tmp_path, layout):
    """--layout overrides detection: a headed TSV is columns, a header-less one triples."""
    src = tmp_path / "d.tsv"
    header = "query\tpositive\tnegative\n" if layout == "columns" else ""
    src.write_text(header + "a\tb\tc\n")
    assert run("--dataset", src, "--out", tmp_path / "o", "--layout", layout) == 0
    assert read_rows(tmp_path / "o" / "d.jsonl") == [
        {"query": "a", "positive": ["b"], "negative": ["c"]}
    ]


def test_no_arguments_converts_the_embedded_example(tmp_path):
    """`python hf_to_training_data.py` alone converts the shipped hub-layout sample offline; its
    configs use FlagEmbedding column names and must give back the demo rows they were made from
    (the last 40 of each training_data/demo file), and the trainer's loader accepts the result."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "hf_to_training_data.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "embedded example dataset" in proc.stdout
    out = tmp_path / "outputs" / "hf_demo_converted"
    assert sorted(p.name for p in out.iterdir()) == ["demo.jsonl", "synthetic.jsonl"]
    for task in ("demo", "synthetic"):
        expected = read_rows(REPO / "training_data" / "demo" / f"{task}.jsonl")[-40:]
        assert read_rows(out / f"{task}.jsonl") == expected
    data = load_training_data(out, TaskRegistry.load())
    assert {t: len(v) for t, v in data.items()} == {"demo": 40, "synthetic": 40}


def test_one_of_dataset_and_out_is_an_error(capsys):
    assert cli_main(["convert", "--dataset", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("conretriever convert: error: --dataset and --out")
        and "Traceback" not in err
    )
