"""Topics: a task's rows grouped by what their documents are about, so a batch can hold
documents that are hard to tell apart.

Why. A batch cut from a task at random holds documents about unrelated things: once a model
has learned the task's surface, every in-batch negative is easy (on SQuAD, training accuracy
passes 0.94 within 25 steps), and a teacher's similarities between unrelated texts say little
beyond "not this one". Batches drawn from one topic put documents of the same subject side by
side, which InfoNCE must separate and whose teacher similarities are informative. TAS-Balanced
(Hofstaetter et al., 2021) clustered MS MARCO's queries for the same reason.

How (``data.topic_rows`` > 0):

1. **Groups.** Rows that share their first positive are one group: the same document asked
   about several times (SQuAD: ~5 questions a paragraph).
2. **Topics.** Each group is the teacher's unit vector of that document (``loss.
   embed_distil_model``, the vectors embedding distillation uses, computed once into the
   verified store). Spherical k-means (cosine; Lloyd's iterations from ``k`` distinct seeded
   groups) cuts a task's groups into ``k = ceil(rows / topic_rows)`` topics, so a topic holds
   ~``topic_rows`` rows on average (k-means does not balance them: some are larger). The
   centroids are fitted on at most :data:`FIT_SAMPLE` groups and every group is then assigned
   in blocks, so a task of millions of rows costs one pass over its vectors. Everything is
   seeded: every rank, and a resumed run, builds the same topics.
3. **An epoch's order** (:func:`topic_order`, called by ``EpochSampler``): the task's rows for
   the epoch, topic after topic in a random order; inside a topic, round-robin over its
   groups (one row of each group, in a shuffled order, then the next round). Consecutive rows,
   which become a batch, thus come from one topic (or two adjacent ones) and, as far as the
   topic has groups, from different documents: a document twice in a batch is its own false
   negative, masked, a wasted slot.

Which rows an epoch uses (each task's weighted share) does not change; only their order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FIT_SAMPLE = 65_536  # groups the centroids are fitted on, at most
ITERATIONS = 15  # Lloyd's iterations; the assignments of a few thousand groups settle in ~10
BLOCK = 8_192  # groups scored against the centroids at once (a [BLOCK, k] float32 matrix)


@dataclass(frozen=True)
class TaskTopics:
    """For each row of one task: its topic and its group (rows sharing a first positive)."""

    topic: tuple[int, ...]
    group: tuple[int, ...]

    @property
    def n_topics(self) -> int:
        return max(self.topic) + 1 if self.topic else 0


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid (dot product of unit vectors) for every vector."""
    out = np.empty(len(vectors), dtype=np.int64)
    for start in range(0, len(vectors), BLOCK):
        out[start : start + BLOCK] = np.argmax(vectors[start : start + BLOCK] @ centroids.T, 1)
    return out


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``vectors`` [n, dim] (unit rows) -> a cluster index per row, in ``range(k)``.

    Lloyd's algorithm on the sphere: assign each vector to the centroid of highest cosine,
    then move each centroid to its members' normalised mean (one left without members stays
    put; a cluster may end empty, so there are at most ``k``). Deterministic for a ``seed``."""
    n = len(vectors)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    fit = vectors if n <= FIT_SAMPLE else vectors[np.sort(rng.choice(n, FIT_SAMPLE, replace=False))]
    centroids = fit[np.sort(rng.choice(len(fit), k, replace=False))].astype(np.float32)
    for _ in range(ITERATIONS):
        labels = _nearest(fit, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, fit)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        kept = norms[:, 0] > 0  # a centroid that lost every member stays where it was
        centroids[kept] = sums[kept] / norms[kept]
    return _nearest(vectors, centroids)


def task_topics(
    positives: Sequence[str], vector_of: Callable[[list[str]], np.ndarray], topic_rows: int,
    seed: int,
) -> TaskTopics:  # fmt: skip
    """Topics of one task's rows (``positives``: each row's first positive; ``vector_of``:
    unit vectors of documents, in order) with ~``topic_rows`` rows a topic; see the module."""
    group_of: dict[str, int] = {}
    group = tuple(group_of.setdefault(text, len(group_of)) for text in positives)
    documents = list(group_of)
    k = math.ceil(len(positives) / topic_rows)
    labels = spherical_kmeans(np.asarray(vector_of(documents), dtype=np.float32), k, seed)
    # number topics by first appearance, so the numbering does not depend on k-means' own
    renumber: dict[int, int] = {}
    topic = tuple(renumber.setdefault(int(labels[g]), len(renumber)) for g in group)
    return TaskTopics(topic=topic, group=group)


def topic_order(rows: Sequence[int], topics: TaskTopics, rng: random.Random) -> list[int]:
    """An epoch's ``rows`` of one task (row indices, repeats allowed) reordered: topics in a
    random order, each topic's rows round-robin over its groups (step 3 of the module)."""
    by_topic: dict[int, dict[int, list[int]]] = {}
    for row in rows:
        by_topic.setdefault(topics.topic[row], {}).setdefault(topics.group[row], []).append(row)
    order = sorted(by_topic)
    rng.shuffle(order)
    out: list[int] = []
    for t in order:
        groups = list(by_topic[t].values())
        while groups:
            rng.shuffle(groups)
            out.extend(g.pop() for g in groups)
            groups = [g for g in groups if g]
    return out


def describe(task: str, topics: TaskTopics) -> str:
    """One log line: how many rows, documents and topics, and how the topics' sizes spread."""
    sizes = np.bincount(np.asarray(topics.topic, dtype=np.int64))
    return (f"topics of {task}: {len(topics.topic)} rows, {max(topics.group) + 1} documents -> "
            f"{len(sizes)} topics (rows a topic: median {int(np.median(sizes))}, "
            f"smallest {int(sizes.min())}, largest {int(sizes.max())})")  # fmt: skip
