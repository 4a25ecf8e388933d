"""The teacher of embedding distillation: its vectors of the texts a run trains on, computed first.

Before the first step, the teacher embedder (``loss.embed_distil_model``, any model spec) encodes
every distinct text the run's batches will hold (:class:`TeacherTexts`): each drawn row's query
(with the instruction the row is trained with, in the teacher's own prompt format) and the
positive and hard negatives drawn with it (as passages). The batch plan is fixed by the seed
before training starts, so these are known in advance; a 120-step run of 16 rows a step draws
1,920 of the CPU recipe's 12,661 rows, and the teacher encodes only those (every row's, when
topic batches need the teacher's vectors of all documents to make the plan). A batch then only
looks its texts up: the teacher never runs during training, and its weights are freed before
training starts.

Queries and passages go through the verified embedding store (``retrieval.store``, under the
evaluation's cache folder, ``$CONRETRIEVER_CACHE/embeddings``): a second run with the same
teacher and data reads them back instead of encoding them again (minutes saved on a CPU: see
docs/training.md, "Machine timings"), and a damaged shard is re-encoded. A query's key is its
instruction and text together, since its vector depends on both.

Every rank holds the whole table (the teacher's vectors are small: 384 floats per text for
all-MiniLM-L6-v2), so any rank can look up any slot of its batch.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from conretriever import runtime

log = logging.getLogger("conretriever.teacher")


@dataclass
class TeacherTexts:
    """The distinct texts a teacher encodes: queries grouped by the instruction they are
    trained with (a query's vector depends on both), and passages; each in first-seen order."""

    queries: dict[str | None, dict[str, None]] = field(default_factory=dict)
    docs: dict[str, None] = field(default_factory=dict)

    def add(self, instruction: str | None, query: str, docs: Sequence[str]) -> None:
        self.queries.setdefault(instruction, {})[query] = None
        self.docs.update(dict.fromkeys(docs))

    @classmethod
    def of_rows(cls, data: dict, registry) -> TeacherTexts:
        """Every row's query and every positive and negative of ``data`` ({task: [Example]})."""
        texts = cls()
        for task, rows in data.items():
            for ex in rows:
                texts.add(ex.instruction or registry.instruction(task), ex.query,
                          [*ex.positives, *ex.negatives])  # fmt: skip
        return texts

    @classmethod
    def of_items(cls, items: Iterable) -> TeacherTexts:
        """The texts of training items (``TrainItem``: the slots batches are built from)."""
        texts = cls()
        for it in items:
            texts.add(it.instruction, it.query, [it.positive, *it.negatives])
        return texts


class TeacherVectors:
    """Text -> the teacher's unit vector, for the queries and documents of a training set."""

    def __init__(self, query_index: dict, query_vectors: np.ndarray, doc_index: dict,
                 doc_vectors: np.ndarray, spec: str):  # fmt: skip
        self.query_index, self.query_vectors = query_index, query_vectors
        self.doc_index, self.doc_vectors = doc_index, doc_vectors
        self.spec = spec

    @property
    def dim(self) -> int:
        return int(self.doc_vectors.shape[1])

    @classmethod
    def build(cls, spec: str, texts: TeacherTexts, device: torch.device, cache_dir=None,
              show_progress: bool = True, doc_max_length: int = 0) -> TeacherVectors:  # fmt: skip
        """Encode ``texts`` with the teacher ``spec`` (through the store under ``cache_dir``),
        its documents cut at ``doc_max_length`` tokens (0: the teacher's own limit; the store
        keys vectors by that limit, so two limits never share a vector)."""
        from conretriever.model.embedder import Embedder
        from conretriever.model.settings import EmbedderSettings

        cut = EmbedderSettings(doc_max_length=doc_max_length) if doc_max_length else None
        teacher = Embedder.from_pretrained(spec, cut, device=device)
        teacher.eval()
        query_index: dict[tuple[str | None, str], int] = {}
        parts = []
        for instruction, queries in texts.queries.items():
            listed = list(queries)
            parts.append(_encode_all(teacher, listed, cache_dir, show_progress, role="query",
                                     instruction=instruction))  # fmt: skip
            base = len(query_index)
            query_index.update({(instruction, q): base + i for i, q in enumerate(listed)})
        doc_texts = list(texts.docs)
        vectors = _encode_all(teacher, doc_texts, cache_dir, show_progress)
        doc_index = {text: i for i, text in enumerate(doc_texts)}
        query_vectors = np.concatenate(parts, axis=0) if parts else np.zeros((0, teacher.dim))
        del teacher
        gc.collect()
        if runtime.is_main():
            log.info("teacher %s: %d queries and %d documents encoded (dim %d)", spec,
                     len(query_index), len(doc_index), vectors.shape[1])  # fmt: skip
        return cls(query_index, query_vectors.astype(np.float32), doc_index,
                   np.ascontiguousarray(vectors, dtype=np.float32), spec)  # fmt: skip

    def documents(self, texts: Sequence[str]) -> np.ndarray:
        """The teacher's unit vectors of training documents [len(texts), dim]."""
        return self.doc_vectors[[self.doc_index[t] for t in texts]]

    def for_items(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's vectors of a rank's batch items, laid out as ``collate`` lays out the
        student's: queries [B, dim_t]; documents [B * (1 + n), dim_t] (positives, then each
        query's negatives)."""
        q_rows = [self.query_index[(it.instruction, it.query)] for it in items]
        texts = [it.positive for it in items] + [n for it in items for n in it.negatives]
        return torch.from_numpy(self.query_vectors[q_rows]), torch.from_numpy(self.documents(texts))


def _encode_all(teacher, texts: list[str], cache_dir, show_progress: bool, **role) -> np.ndarray:
    """Every one of ``texts`` through the store; each rank encodes its slice, all get all."""
    from conretriever.retrieval.corpus import encode_corpus

    vectors = encode_corpus(teacher, texts, cache_dir=cache_dir, show_progress=show_progress,
                            **role).to_array()  # fmt: skip
    if runtime.is_distributed():  # encode_corpus gives this rank's slice: share them all
        pieces: list = [None] * runtime.world_size()
        torch.distributed.all_gather_object(pieces, vectors)
        vectors = np.concatenate(pieces, axis=0)
    return vectors
