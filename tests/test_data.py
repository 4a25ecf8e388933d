"""Training data: validation messages, task registry, config parsing, epoch sampling."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from conretriever.data.tasks import TaskRegistry, eval_instruction
from conretriever.data.training import (
    DataError,
    EpochSampler,
    build_items,
    load_training_data,
    read_task_file,
)
from conretriever.training.config import ConfigError, parse_config


def _write(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = {"query": "q", "positive": ["p"], "negative": ["n"]}


@pytest.mark.parametrize(
    "bad, field, line_text",
    [
        ('{"query": "q", "positive": ["p"]', None, "malformed JSON"),
        ({"positive": ["p"]}, "query", "missing"),
        ({"query": "   ", "positive": ["p"]}, "query", "empty"),
        ({"query": "q", "positive": []}, "positive", "empty"),
        ({"query": "q"}, "positive", "missing"),
        ({"query": "q", "positive": ["p"], "negative": "n" and 3}, "negative", "expected"),
        ({"query": 7, "positive": ["p"]}, "query", "expected a string"),
    ],
)
def test_bad_line_is_named(tmp_path, bad, field, line_text):
    path = _write(tmp_path / "nq.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        load_training_data(tmp_path, TaskRegistry())
    msg = str(err.value)
    assert f"{path}:3:" in msg and line_text in msg
    if field:
        assert f"field '{field}'" in msg


def test_unknown_task_needs_instruction(tmp_path):
    _write(tmp_path / "mytask.jsonl", [{**GOOD, "instruction": "Given x, find y"}, GOOD])
    with pytest.raises(DataError, match=r"mytask.jsonl:2: field 'instruction'"):
        load_training_data(tmp_path, TaskRegistry())
    reg_file = tmp_path / "tasks.yaml"
    reg_file.write_text("mytask: {weight: 2.0, query_type: a thing, passage_type: docs}\n")
    data = load_training_data(tmp_path / "mytask.jsonl", TaskRegistry.load(reg_file))
    assert data["mytask"][0].instruction == "Given x, find y"
    assert TaskRegistry.load(reg_file).instruction("mytask") == "Given a thing, retrieve docs"


def test_gzip_string_positive_and_optional_negative(tmp_path):
    with gzip.open(tmp_path / "squad.jsonl.gz", "wt") as f:
        f.write(json.dumps({"query": "q1", "positive": "only one"}) + "\n\n")
        f.write(json.dumps({"query": "q2", "positive": ["a", "b"], "negative": []}) + "\n")
    data = load_training_data(tmp_path, TaskRegistry())
    rows = data["squad"]
    assert rows[0].positives == ("only one",) and rows[0].negatives == ()
    assert rows[1].positives == ("a", "b") and rows[1].source.endswith("squad.jsonl.gz:3")


def test_errors_are_collected_and_nothing_loads(tmp_path):
    _write(tmp_path / "fever.jsonl", [GOOD, {"query": "q"}])
    _write(tmp_path / "nq.jsonl", ["not json", GOOD])
    with pytest.raises(DataError) as err:
        load_training_data(tmp_path, TaskRegistry())
    assert "fever.jsonl:2" in str(err.value) and "nq.jsonl:1" in str(err.value)


def test_registry_and_eval_instructions():
    reg = TaskRegistry()
    assert reg.instruction("msmarco_passage") == (
        "Given a web search query, retrieve relevant passages that answer the query"
    )
    assert eval_instruction("SciFact") == eval_instruction("/data/beir/scifact")
    assert eval_instruction("ArguAna") == "Given a claim, find documents that refute the claim"


def test_config_yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        "train:\n  learning_rate: 5.0e-5\n  temperature: 0.01\nmodel:\n  lora_r: 8\n"
    )
    cfg = parse_config(["--config", str(cfg_file), "--temperature", "0.05", "--use_lora", "no"])
    assert cfg.train.learning_rate == 5e-5 and cfg.loss.temperature == 0.05
    assert cfg.model.lora.r == 8 and cfg.model.use_lora is False
    cfg_file.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(
        ConfigError,
        match=r"c.yaml: train.learning_rat: unknown key \(did you mean 'learning_rate'\?\)",
    ):
        parse_config(["--config", str(cfg_file)])
    with pytest.raises(ConfigError, match="temperature"):
        parse_config(["--temperature", "0"])


def test_weighted_epoch_counts():
    sampler = EpochSampler({"a": 40, "b": 40}, {"a": 2.0, "b": 0.5}, 4, seed=3)
    assert sampler.epoch_counts() == {"a": 80, "b": 20}
    for epoch in range(2):
        batches = sampler.batches(epoch)
        counts = Counter(task for batch in batches for task, _ in batch)
        assert counts == {"a": 80, "b": 20}
        rows_a = Counter(i for batch in batches for t, i in batch if t == "a")
        assert set(rows_a.values()) == {2}  # weight 2.0: every row exactly twice
        rows_b = [i for batch in batches for t, i in batch if t == "b"]
        assert len(set(rows_b)) == 20  # weight 0.5: 20 distinct rows
    b0 = {i for batch in sampler.batches(0) for t, i in batch if t == "b"}
    b1 = {i for batch in sampler.batches(1) for t, i in batch if t == "b"}
    assert b0 != b1  # the subsample is drawn afresh each epoch
    assert sampler.batches(1) == EpochSampler({"a": 40, "b": 40}, {"a": 2, "b": 0.5}, 4, 3).batches(
        1
    )


def test_same_task_batches_on_every_rank():
    world, per_device = 2, 3
    sampler = EpochSampler({"a": 31, "b": 17, "c": 9}, {}, world * per_device, seed=0)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 31 // 6 + 17 // 6 + 9 // 6
    for batch in batches:
        for rank in range(world):
            local = batch[rank * per_device : (rank + 1) * per_device]
            assert len({t for t, _ in local}) == 1
        assert len({t for t, _ in batch}) == 1  # the whole global batch too
    mixed = EpochSampler({"a": 31, "b": 17, "c": 9}, {}, 6, seed=0, batch_same_task=False)
    assert any(len({t for t, _ in b}) > 1 for b in mixed.batches(0))


def test_negative_draw_is_deterministic_and_repeats(tmp_path):
    rows = [
        {"query": "q0", "positive": ["p0"], "negative": ["n0a"]},
        {"query": "q1", "positive": ["p1"]},
        {"query": "q2", "positive": ["p2"], "negative": ["n2a", "n2b", "n2c"]},
    ]
    data = {"nq": read_task_file(_write(tmp_path / "nq.jsonl", rows))}
    reg = TaskRegistry()
    slots = [("nq", 0), ("nq", 1), ("nq", 2)]
    items = build_items(slots, data, reg, 2, seed=1, epoch=0, batch_index=5)
    assert items[0].negatives == ["n0a", "n0a"]  # fewer than asked: repeated
    assert set(items[1].negatives) <= {"p0", "p2"}  # none: other rows' positives
    assert len(set(items[2].negatives)) == 2 and set(items[2].negatives) <= {"n2a", "n2b", "n2c"}
    again = build_items(slots, data, reg, 2, seed=1, epoch=0, batch_index=5)
    assert [i.negatives for i in again] == [i.negatives for i in items]
    assert items[0].query == "q0"  # formatted later, by the model (collate)
    assert items[0].instruction.startswith("Given a question, retrieve Wikipedia passages")
    assert data["nq"][2].negatives == ("n2a", "n2b", "n2c")  # data never mutated
