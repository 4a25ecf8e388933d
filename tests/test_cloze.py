"""conretriever cloze: inverse-cloze pairs (a sentence -> the rest of its passage)."""

from __future__ import annotations

import json
from pathlib import Path

from conretriever.cli import main as cli_main
from conretriever.data.cloze import ClozeSettings, cloze_rows, split_sentences
from conretriever.data.tasks import TaskRegistry
from conretriever.data.training import read_task_file

PASSAGE = (
    "The Amazon river carries more water than any other river on Earth. Its basin covers "
    "about seven million square kilometres of South America. Most of the basin is covered "
    "by tropical rain forest. Dr. Smith measured its discharge in 1998 near the town of Obidos."
)
SHORT = "Two sentences only here in this passage. Not enough context for a query."


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_sentences_at_ends_followed_by_a_capital():
    assert split_sentences(PASSAGE) == [
        "The Amazon river carries more water than any other river on Earth.",
        "Its basin covers about seven million square kilometres of South America.",
        "Most of the basin is covered by tropical rain forest.",
        # "Dr. Smith": an abbreviation before a capital splits (the documented weakness)
        "Dr.",
        "Smith measured its discharge in 1998 near the town of Obidos.",
    ]
    assert split_sentences('He said "Stop." Then he left. e.g. this stays.') == [
        'He said "Stop."',
        "Then he left. e.g. this stays.",
    ]


def test_split_sentences_in_any_script_and_with_curly_quotes():
    assert split_sentences("La Terre tourne. \u00c9lodie le sait. 3 fois par jour.") == [
        "La Terre tourne.",
        "\u00c9lodie le sait.",
        "3 fois par jour.",
    ]
    assert split_sentences("\u201cStop.\u201d Then he left. \u00abNon.\u00bb \u201cOui.\u201d") == [
        "\u201cStop.\u201d",
        "Then he left.",
        "\u00abNon.\u00bb",
        "\u201cOui.\u201d",
    ]


def test_a_passage_s_rows_do_not_depend_on_the_other_passages():
    settings = ClozeSettings(data=[Path("x")], output=Path("o"), seed=5)
    other = PASSAGE.replace("Amazon", "Nile")
    alone = list(cloze_rows([("", PASSAGE)], settings))
    after = list(cloze_rows([("", other), ("", SHORT), ("", PASSAGE)], settings))
    assert after[-1] == alone[0]


def test_the_query_sentence_is_cut_out_of_its_positive():
    settings = ClozeSettings(data=[Path("x")], output=Path("o"), keep_sentence=0.0, seed=3)
    rows = list(cloze_rows([("", PASSAGE), ("", SHORT)], settings))
    assert len(rows) == 1  # SHORT has 2 sentences: below min_sentences (3)
    (row,) = rows
    sentences = split_sentences(PASSAGE)
    assert row["query"] in sentences and row["query"] != "Dr."  # "Dr." is under min_words
    assert row["query"] not in row["positive"][0]
    rest = [s for s in sentences if s != row["query"]]
    assert row["positive"] == [" ".join(rest)]
    assert row["negative"] == [] and row["instruction"] == settings.instruction


def test_keep_sentence_keeps_the_whole_passage_and_per_passage_draws_distinct_sentences():
    settings = ClozeSettings(
        data=[Path("x")], output=Path("o"), keep_sentence=1.0, per_passage=3, seed=0
    )
    rows = list(cloze_rows([("", PASSAGE)], settings))
    whole = " ".join(split_sentences(PASSAGE))
    assert len(rows) == 3 and len({r["query"] for r in rows}) == 3
    assert all(r["positive"] == [whole] for r in rows)
    # four sentences have 6-64 words: asking for 10 gives those 4, no repeats
    settings.per_passage = 10
    assert len(list(cloze_rows([("", PASSAGE)], settings))) == 4


def test_cli_reads_training_and_corpus_files_once_per_passage_and_is_seeded(tmp_path):
    train = write_jsonl(
        tmp_path / "squad.jsonl",
        [
            {"query": "q1", "positive": [PASSAGE], "negative": [SHORT]},
            {"query": "q2", "positive": [PASSAGE]},  # the same passage again: read once
        ],
    )
    corpus = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"_id": "d1", "title": "Rivers", "text": PASSAGE.replace("Amazon", "Nile")}],
    )
    out = tmp_path / "cloze.jsonl"
    args = ["cloze", "--data", str(train), str(corpus), "--output", str(out), "--seed", "1"]
    assert cli_main(args) == 0
    rows = rows_of(out)
    assert len(rows) == 2  # one per distinct passage with enough sentences
    nile = [r for r in rows if "Nile" in r["positive"][0] + r["query"]]
    assert len(nile) == 1 and nile[0]["positive"][0].startswith("Rivers ")  # title: context
    # the file is valid training data, instruction included, as the trainer reads it
    examples = read_task_file(out, registry=TaskRegistry())
    assert [e.query for e in examples] == [r["query"] for r in rows]
    first = out.read_text()
    assert cli_main([*args, "--overwrite"]) == 0 and out.read_text() == first
    assert cli_main([*args[:-1], "2", "--overwrite"]) == 0 and out.read_text() != first


def test_gz_input_string_positive_null_title_and_a_beir_folder_s_corpus_only(tmp_path):
    import gzip

    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"query": "q", "positive": PASSAGE}) + "\n")
    beir = tmp_path / "beir"
    beir.mkdir()
    write_jsonl(beir / "corpus.jsonl", [{"_id": "1", "title": None, "text": PASSAGE + " Yes."}])
    # a BEIR folder's queries are evaluation data: never read as passages
    write_jsonl(beir / "queries.jsonl", [{"_id": "q", "text": SHORT + " A third one here."}])
    out = beir / "cloze.jsonl"  # written into a folder it reads: not read back on a rerun
    args = ["cloze", "--data", str(gz), str(beir), "--output", str(out)]
    assert cli_main(args) == 0
    first = out.read_text()
    positives = [r["positive"][0] for r in rows_of(out)]
    assert len(positives) == 2 and not any("third" in p for p in positives)
    assert cli_main([*args, "--overwrite"]) == 0 and out.read_text() == first


def test_bad_inputs_are_named_and_nothing_is_replaced(tmp_path, capsys):
    out = tmp_path / "cloze.jsonl"
    out.write_text("kept\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": [PASSAGE]}) + "\n" + '{"title": "x"}\n')
    assert cli_main(["cloze", "--data", str(bad), "--output", str(out), "--overwrite"]) == 2
    assert f"{bad}:2: no 'positive', 'negative' or 'text' field" in capsys.readouterr().err
    bad.write_text(json.dumps({"positive": [PASSAGE, 7]}) + "\n")
    assert cli_main(["cloze", "--data", str(bad), "--output", str(out), "--overwrite"]) == 2
    assert f"{bad}:1: field 'positive': expected a string" in capsys.readouterr().err
    bad.write_text(json.dumps({"positive": [PASSAGE], "text": "x"}) + "\n")
    assert cli_main(["cloze", "--data", str(bad), "--output", str(out), "--overwrite"]) == 2
    assert f"{bad}:1: fields 'positive' and 'text'" in capsys.readouterr().err
    bad.write_text('{"positive": ["a \\ud800 b"]}\n')
    assert cli_main(["cloze", "--data", str(bad), "--output", str(out), "--overwrite"]) == 2
    assert f"{bad}:1: field 'positive': holds a lone surrogate" in capsys.readouterr().err
    bad.write_bytes(json.dumps({"positive": ["caf\u00e9"]}, ensure_ascii=False).encode("latin-1"))
    assert cli_main(["cloze", "--data", str(bad), "--output", str(out), "--overwrite"]) == 2
    assert f"{bad}: cannot read" in capsys.readouterr().err
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_text("{}\n")
    assert cli_main(["cloze", "--data", str(fake_gz), "--output", str(out), "--overwrite"]) == 2
    assert f"{fake_gz}: cannot read" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli_main(["cloze", "--data", str(empty), "--output", str(out), "--overwrite"]) == 2
    assert f"no passage in {empty}" in capsys.readouterr().err
    assert cli_main(["cloze", "--data", str(empty), "--output", str(out) + ".gz"]) == 2
    assert "write a plain .jsonl" in capsys.readouterr().err
    short = write_jsonl(tmp_path / "short.jsonl", [{"positive": [SHORT]}])
    assert cli_main(["cloze", "--data", str(short), "--output", str(out), "--overwrite"]) == 2
    assert "no row written" in capsys.readouterr().err
    assert cli_main(["cloze", "--data", str(short), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "kept\n"  # no failed run touched it
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["bad.jsonl", "cloze.jsonl", "empty.jsonl", "fake.jsonl.gz", "short.jsonl"]
