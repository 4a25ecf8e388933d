"""Topic batches (``data.topic_rows``, ``conretriever.data.topics``): documents clustered by a
teacher's vectors, an epoch's rows ordered topic by topic, nothing else of the plan changed."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import numpy as np
import pytest

from conretriever.data.topics import spherical_kmeans, task_topics, topic_order
from conretriever.data.training import EpochSampler
from conretriever.errors import ConfigError


def _subjects(n_subjects: int, per_subject: int, dim: int = 16, seed: int = 0):
    """Unit vectors in tight bundles around ``n_subjects`` orthogonal directions, and the
    bundle of each."""
    rng = np.random.default_rng(seed)
    axes = np.eye(dim, dtype=np.float32)[:n_subjects]
    labels = np.repeat(np.arange(n_subjects), per_subject)
    vectors = axes[labels] + 0.05 * rng.standard_normal((len(labels), dim)).astype(np.float32)
    order = rng.permutation(len(labels))  # the bundles interleaved, as rows of a file are
    vectors, labels = vectors[order], labels[order]
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def test_spherical_kmeans_finds_the_subjects_and_is_seeded():
    vectors, truth = _subjects(4, 30)
    labels = spherical_kmeans(vectors, 4, seed=1)
    # each true subject is one cluster, and no two subjects share one
    assert all(len(set(labels[truth == s])) == 1 for s in range(4))
    assert len({labels[truth == s][0] for s in range(4)}) == 4
    assert np.array_equal(labels, spherical_kmeans(vectors, 4, seed=1))


def test_task_topics_group_rows_by_document_and_cluster_documents_by_subject():
    vectors, truth = _subjects(3, 8)
    # 24 documents, each asked about by 1-3 rows (as SQuAD asks several questions of one paragraph)
    docs = [f"doc {i}" for i in range(24)]
    vector_of = dict(zip(docs, vectors, strict=True))
    positives = [d for i, d in enumerate(docs) for _ in range(1 + i % 3)]
    calls = []

    def lookup(texts):
        calls.append(list(texts))
        return np.stack([vector_of[t] for t in texts])

    topics = task_topics(positives, lookup, topic_rows=16, seed=0)
    assert calls == [docs]  # each distinct document looked up once, in first-seen order
    assert len(topics.topic) == len(topics.group) == len(positives)
    for i, j in [(a, b) for a in range(len(positives)) for b in range(len(positives))]:
        same_doc = positives[i] == positives[j]
        assert (topics.group[i] == topics.group[j]) == same_doc
        if same_doc or truth[docs.index(positives[i])] == truth[docs.index(positives[j])]:
            assert topics.topic[i] == topics.topic[j]
    assert topics.n_topics == 3 == math.ceil(len(positives) / 16)
    assert topics.topic[0] == 0  # numbered by first appearance


def _planted(n_topics: int, groups_per_topic: int, rows_per_group: int):
    """A task's TaskTopics with a known layout."""
    from conretriever.data.topics import TaskTopics

    topic, group = [], []
    for t in range(n_topics):
        for g in range(groups_per_topic):
            topic += [t] * rows_per_group
            group += [t * groups_per_topic + g] * rows_per_group
    return TaskTopics(topic=tuple(topic), group=tuple(group))


def test_the_epoch_plan_with_topics_keeps_its_rows_and_fills_batches_from_one_topic():
    """Topics change the order of an epoch's rows, never which rows: the same slots (and the
    same number of batches) as without them. Every batch comes from one topic (the topics here
    hold a whole number of batches), no batch repeats a document (each topic has more
    documents than a batch has rows), and the plan is a function of (seed, epoch)."""
    topics = _planted(n_topics=4, groups_per_topic=10, rows_per_group=2)  # 80 rows, 20 a topic
    sizes, batch = {"a": 80, "b": 30}, 5
    plain = EpochSampler(sizes, {"b": 1.5}, batch, seed=3)
    topical = EpochSampler(sizes, {"b": 1.5}, batch, seed=3)
    topical.topics = {"a": topics}
    for epoch in (0, 1):
        ours, theirs = topical.batches(epoch), plain.batches(epoch)
        assert len(ours) == len(theirs) == len(topical)
        assert Counter(s for b in ours for s in b) == Counter(s for b in theirs for s in b)
        for b in (b for b in ours if b[0][0] == "a"):
            assert len({topics.topic[i] for _, i in b}) == 1
            assert len({topics.group[i] for _, i in b}) == batch
    assert topical.batches(1) == topical.batches(1) and topical.batches(0) != topical.batches(1)


def test_topic_order_spreads_a_documents_rows_over_rounds():
    """Inside a topic, rows go round-robin over its documents: a document's second row comes
    only after every document of the topic has given one (repeated rows of a weight > 1 too)."""
    import random

    topics = _planted(n_topics=1, groups_per_topic=6, rows_per_group=3)
    rows = list(range(18)) * 2  # weight 2: every row twice
    order = topic_order(rows, topics, random.Random(0))
    assert sorted(order) == sorted(rows)
    for k in range(0, 36, 6):  # each round of 6 holds each document once
        assert sorted(topics.group[i] for i in order[k : k + 6]) == list(range(6))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--topic_rows", "64"], "--topic_rows groups rows by a teacher's document vectors"),
        (["--topic_rows", "64", "--embed_distil_model", "embedded:minilm",
          "--batch_same_task", "false"], "--topic_rows orders each task's rows by topic"),
        (["--topic_rows", "-1"], "--topic_rows"),
    ],
)  # fmt: skip
def test_topic_batches_refuse_what_they_cannot_do(flags, message):
    from conretriever.training.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


def test_training_with_topic_batches_builds_topics_from_the_teacher(tiny_decoder, tiny_encoder,
                                                                    tmp_path, monkeypatch,
                                                                    caplog, capsys):  # fmt: skip
    """A run with topics and no embedding distillation: the teacher's vectors make the topics,
    the log names them, no distillation term is trained, and a topic size change is part of the
    trajectory (a resume with another value is refused)."""
    from conretriever.cli import main as cli

    monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"query": f"question {i}", "positive": [f"answer {i // 2}"], "negative": [f"no {i}"]}
            for i in range(16)]  # fmt: skip
    (data / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    base = ["train", "--model_name_or_path", str(tiny_decoder), "--train_data", str(data),
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none",
            "--embed_distil_model", str(tiny_encoder), "--output_dir", str(run),
            "--save_steps", "1"]  # fmt: skip
    caplog.set_level(logging.INFO)
    assert cli([*base, "--topic_rows", "8"]) == 0
    assert "topics of nq: 16 rows, 8 documents -> " in caplog.text  # (random teacher: 1-2)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and not any("embed_kl" in r for r in metrics)
    capsys.readouterr()
    assert cli([*base, "--topic_rows", "4", "--resume", "true"]) != 0
    assert "changed settings (data.topic_rows: 8 -> 4)" in capsys.readouterr().err
