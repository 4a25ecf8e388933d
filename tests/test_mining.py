"""Hard-negative mining (fixed vectors, so every rank is known) and decontamination."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conretriever.cli import main as cli_main
from conretriever.data.decontam import DecontamSettings, decontaminate, normalize_text
from conretriever.data.tasks import TaskRegistry
from conretriever.data.training import DataError, read_task_file
from conretriever.retrieval.mining import MineSettings, mine, parse_window


class FixedEmbedder(nn.Module):
    """Looks texts up in a table of vectors; records (role, instruction, texts) of each call."""

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.table = {t: np.asarray(v, np.float32) / np.linalg.norm(v) for t, v in table.items()}
        self.register_buffer("marker", torch.zeros(1))  # gives model_fingerprint a tensor
        self.calls: list[tuple[str, str | None, list[str]]] = []

    @property
    def dim(self) -> int:
        return 3

    def encode(
        self,
        texts,
        role="query",
        instruction=None,
        batch_size=32,
        max_length=None,
        show_progress=None,
    ):
        self.calls.append((role, instruction, list(texts)))
        return np.stack([self.table[t] for t in texts])


def doc_at(score: float, direction: str = "z") -> list[float]:
    """A unit vector whose dot product with the query [1, 0, 0] is ``score``; the rest of its
    length points along y or z, so docs along z are far from a positive along y."""
    rest = math.sqrt(1 - score**2)
    return [score, rest, 0.0] if direction == "y" else [score, 0.0, rest]


POSITIVE = "The Positive passage."


def fixture_table() -> tuple[dict, list[str]]:
    # doc k scores 1 - k/100, so its 1-based rank is k (the specials below slot in between).
    docs = [f"doc {k}" for k in range(1, 41)]
    table = {d: doc_at(1 - k / 100) for k, d in enumerate(docs, 1)}
    table["what is it"] = [1.0, 0.0, 0.0]  # the query
    table[POSITIVE] = doc_at(0.885, "y")  # rank 12
    table["the positive passage"] = doc_at(0.875, "z")  # same text after normalisation: rank 14
    table["A rewritten copy of the positive."] = doc_at(0.865, "y")  # cosine ~1.0: rank 16
    return table, docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(tmp_path):
    table, docs = fixture_table()
    corpus = docs + [POSITIVE, "the positive passage", "A rewritten copy of the positive."]
    write_jsonl(
        tmp_path / "corpus.jsonl", [{"_id": str(i), "text": t} for i, t in enumerate(corpus)]
    )
    data = write_jsonl(tmp_path / "nq.jsonl", [{"query": "what is it", "positive": [POSITIVE]}])
    return FixedEmbedder(table), data, tmp_path


def settings_for(data: Path, tmp: Path, **kw) -> MineSettings:
    base = dict(
        model="fixed",
        data=data,
        corpus=str(tmp / "corpus.jsonl"),
        output=tmp / "out.jsonl",
        window="5-20",
        n_negatives=100,
        progress=False,
    )
    return MineSettings(**{**base, **kw})


def test_negatives_come_from_window_and_exclude_positives(setup):
    embedder, data, tmp = setup
    report = mine(settings_for(data, tmp), embedder=embedder)
    (row,) = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    # ranks 5..20 hold doc 5..doc 17 plus the three specials at ranks 12, 14, 16
    assert row["negative"] == [f"doc {k}" for k in range(5, 18)]
    assert POSITIVE not in row["negative"]
    assert report.candidates == 16
    assert report.dropped_positive == 2  # the positive and its lower-cased copy
    assert report.dropped_near_duplicate == 1  # the rewrite (cosine 1.0 > 0.95)
    assert report.negatives_written == 13 and report.rows_short == 1
    assert report.near_cosine_counts == {">=0.9": 1, ">=0.95": 1, ">=0.98": 1}
    assert report.max_cosine_to_positive == pytest.approx(0.9994, abs=1e-3)
    # the query was encoded as a query with nq's registry instruction, the corpus as passages
    roles = {(role, inst) for role, inst, _ in embedder.calls}
    assert roles == {("passage", None), ("query", TaskRegistry.load().instruction("nq"))}


def test_threshold_one_keeps_near_duplicate_and_seeded_subset(setup):
    embedder, data, tmp = setup
    report = mine(settings_for(data, tmp, dedup_threshold=1.01), embedder=embedder)
    negatives = json.loads((tmp / "out.jsonl").read_text())["negative"]
    assert "A rewritten copy of the positive." in negatives and report.dropped_near_duplicate == 0

    def pick(seed: int) -> list[str]:
        mine(settings_for(data, tmp, n_negatives=4, seed=seed), embedder=embedder)
        return json.loads((tmp / "out.jsonl").read_text())["negative"]

    a, b, c = pick(1), pick(1), pick(2)
    assert a == b and len(a) == 4 and a != c
    window = [f"doc {k}" for k in range(5, 18)]
    assert set(a) <= set(window) and a == sorted(a, key=window.index)  # written in rank order
    mine(settings_for(data, tmp, n_negatives=3, pick="top"), embedder=embedder)
    assert json.loads((tmp / "out.jsonl").read_text())["negative"] == ["doc 5", "doc 6", "doc 7"]


def test_self_corpus_and_row_instruction(tmp_path):
    table = {
        "q1": [1, 0, 0],
        "q2": [0, 1, 0],
        "p1": [1, 0.1, 0],
        "p2": [0, 1, 0.1],
        "n1": [0.9, 0.3, 0.3],
        "n2": [0.3, 0.9, 0.3],
    }
    rows = [
        {"query": "q1", "positive": ["p1"], "negative": ["n1"], "instruction": "Find p1"},
        {"query": "q2", "positive": ["p2"], "negative": ["n2"]},
    ]
    data = write_jsonl(tmp_path / "mytask.jsonl", rows)
    embedder = FixedEmbedder(table)
    settings = MineSettings(
        model="fixed",
        data=data,
        corpus="self",
        output=tmp_path / "o.jsonl",
        window="1-4",
        n_negatives=2,
        progress=False,
    )
    report = mine(settings, embedder=embedder)
    assert report.corpus_docs == 4  # p1, n1, p2, n2
    out = read_task_file(tmp_path / "o.jsonl")
    assert out[0].instruction == "Find p1" and out[1].instruction is None
    for ex in out:
        assert len(ex.negatives) == 2 and not set(ex.negatives) & set(ex.positives)
    queries = {tuple(texts): inst for role, inst, texts in embedder.calls if role == "query"}
    assert queries == {("q1",): "Find p1", ("q2",): None}  # mytask has no registry entry


def test_cli_with_real_embedder_and_cache(tmp_path, tiny_encoder, capsys):
    corpus = [
        {"_id": str(i), "title": f"title {i}", "text": f"passage number {i} about x"}
        for i in range(30)
    ]
    write_jsonl(tmp_path / "corpus.jsonl", corpus)
    rows = [
        {"query": f"question {i}", "positive": [f"title {i} passage number {i} about x"]}
        for i in range(5)
    ]
    data = write_jsonl(tmp_path / "fiqa.jsonl", rows)
    args = [
        "--model",
        str(tiny_encoder),
        "--data",
        str(data),
        "--corpus",
        str(tmp_path),
        "--out",
        str(tmp_path / "mined.jsonl"),
        "--window",
        "2-10",
        "--n-negatives",
        "3",
        "--dedup-threshold",
        "1.01",  # a random-init encoder puts all these similar texts above cosine 0.98
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    assert cli_main(["mine", *args]) == 0
    out = read_task_file(tmp_path / "mined.jsonl")
    assert [len(ex.negatives) for ex in out] == [3] * 5
    assert all(ex.positives[0] not in ex.negatives for ex in out)
    assert any((tmp_path / "cache").rglob("*.emb.npy"))
    first = (tmp_path / "mined.jsonl").read_text()
    assert cli_main(["mine", *args]) == 2  # an existing output is not replaced by surprise
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "mined.jsonl").read_text() == first
    # the second run reads the cache and mines the same negatives
    assert cli_main(["mine", *args, "--overwrite"]) == 0
    assert (tmp_path / "mined.jsonl").read_text() == first
    assert cli_main(["mine", *args[:-1], "--window", "9-3"]) == 2
    assert "needs 1 <= LO <= HI" in capsys.readouterr().err


def test_bad_corpus_row_is_named(setup):
    embedder, data, tmp = setup
    (tmp / "corpus.jsonl").write_text('{"_id": "1", "text": "a"}\n{"_id": "2"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: field 'text'"):
        mine(settings_for(data, tmp), embedder=embedder)
    assert not (tmp / "out.jsonl").exists()


def test_parse_window():
    assert parse_window("30-100") == (30, 100)
    for bad in ("0-5", "10", "a-b"):
        with pytest.raises(ValueError):
            parse_window(bad)


# --- decontamination ----------------------------------------------------------------------------


def make_eval(folder: Path) -> Path:
    folder.mkdir()
    doc = " ".join(f"w{i}" for i in range(30))  # 30 distinct words: 18 13-grams
    write_jsonl(
        folder / "corpus.jsonl",
        [{"_id": "d1", "title": "", "text": doc}, {"_id": "d2", "title": "", "text": "other doc"}],
    )
    write_jsonl(
        folder / "queries.jsonl",
        [{"_id": "1", "text": "Does X cause Y?"}, {"_id": "2", "text": "a train-only query"}],
    )
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n")
    return folder


def test_decontamination_kinds_and_drop(tmp_path):
    ev = make_eval(tmp_path / "ev")
    words = [f"w{i}" for i in range(30)]
    rows = [
        {"query": "Does X cause Y?", "positive": ["p"]},  # exact query
        {"query": "does x  cause y", "positive": ["p"]},  # normalised query
        {"query": "q", "positive": ["intro " + " ".join(words[5:18]) + " outro"]},  # one 13-gram
        {"query": "q", "positive": [" ".join(words[5:17])]},  # 12 words: no 13-gram
        {"query": "a train-only query", "positive": ["other doc"]},  # not in the test split
    ]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    settings = DecontamSettings(eval_dirs=[ev], data=[data])
    report = decontaminate(settings, drop_out=tmp_path / "clean.jsonl")
    assert report["by_kind"] == {"exact": 1, "normalized": 1, "ngram": 1}
    assert report["by_field"]["positive"]["ngram"] == 1
    assert report["by_eval_side"] == {"query": 2, "document": 1}
    assert report["examples"]["exact"][0]["train"] == f"{data}:1"
    kept = (tmp_path / "clean.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in kept] == rows[3:]
    strict = DecontamSettings(eval_dirs=[ev], data=[data], min_ngram_fraction=0.5)
    assert decontaminate(strict)["by_kind"]["ngram"] == 0  # 1 of 3 n-grams shared < 50 %


def test_normalize_text():
    assert normalize_text("  Hello,\tWORLD!! it's") == "hello world it s"


def test_squad_against_scifact(shared_data, tmp_path):
    settings = DecontamSettings(
        eval_dirs=[shared_data / "scifact"], data=[shared_data / "train" / "squad.jsonl.gz"]
    )
    report = decontaminate(settings)
    assert report["training_rows"] == 10570
    assert report["eval"] == {"queries": 300, "documents": 283}
    assert report["flagged_rows"] == 0  # Wikipedia questions vs biomedical claims
