"""Training data: task files -> validated examples -> per-epoch global batches -> token tensors.

Files. A training folder holds one ``<task>.jsonl`` (or ``.jsonl.gz``) per task; each line is
``{"query": str, "positive": str | [str], "negative": [str] (optional), "instruction": str
(optional)}``. Every line is validated before anything trains: malformed JSON, a missing or empty
``query``/``positive``, wrong types, or a task that has neither a registry instruction nor an
``instruction`` on the row are reported as ``file:line: field 'x': problem`` (up to 20 at once),
and the whole load fails, so a run never starts on a partly-read folder.

Sampling. An epoch is a list of GLOBAL batches (``world_size * per_device`` rows each), computed
deterministically from ``(seed, epoch)`` so every rank builds the same plan without talking:

1. each task contributes ``round(weight * n_rows)`` rows: whole copies for the integer part of the
   weight plus a fresh random subset for the fraction (2.0 = every row twice, 0.5 = a random
   half, different each epoch);
2. with ``batch_same_task`` rows are shuffled within their task and cut into global batches, so a
   batch's in-batch negatives all come from one task (as E5 trained); a task's last incomplete
   batch is dropped (a duplicate row would be its own false negative); the batches of all tasks
   are then shuffled together. Without it, all rows are shuffled together and cut. With
   ``topic_rows`` (``data.topics``) a task's shuffled rows are reordered topic by topic before
   the cut, so a batch's documents share a subject.
3. rank ``r`` takes slice ``r`` of each global batch.

For every slot of the plan, one positive and ``n_hard_negative`` negatives are drawn from the row
with a generator seeded by ``(seed, epoch, batch, slot)``: nothing in the data is mutated, a
resumed run draws exactly what the uninterrupted run drew, and rows with fewer negatives than
asked repeat theirs (a row with none borrows positives of other rows of its task).
"""

from __future__ import annotations

import difflib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conretriever.data.tasks import TaskRegistry
from conretriever.data.topics import TaskTopics, topic_order
from conretriever.errors import DataError
from conretriever.files import json_line, open_text

MAX_REPORTED_ERRORS = 20
log = logging.getLogger("conretriever.data")


@dataclass(frozen=True)
class Example:
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    instruction: str | None
    task: str
    source: str  # "file:line", for messages
    pos_scores: tuple[float, ...] | None = None  # teacher scores, aligned with positives
    neg_scores: tuple[float, ...] | None = None  # teacher scores, aligned with negatives


def task_name(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _str_list(value, field: str, where: str, errors: list[str], required: bool) -> tuple:
    if value is None:
        if required:
            errors.append(f"{where}: field '{field}': missing")
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        errors.append(f"{where}: field '{field}': expected a string or a list of strings")
        return ()
    items = [v for v in items if v.strip()]
    if required and not items:
        errors.append(f"{where}: field '{field}': empty")
    return tuple(items)


ROW_KEYS = ("query", "positive", "negative", "instruction", "pos_scores", "neg_scores", "scores")


def extra_keys(row: dict) -> list[str]:
    return [k for k in row if k not in ROW_KEYS]


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, ROW_KEYS, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"field {key!r}: unknown key{hint}; rows take {', '.join(ROW_KEYS)} "
        "(--allow_extra_fields true ignores other keys on purpose)"
    )


def parse_row(
    row: object, where: str, task: str, errors: list[str], allow_extra: bool = False
) -> Example | None:
    """Validate one decoded JSON row; append problems to ``errors``. A key the trainer does not
    know (``negatives`` for ``negative``...) is a problem unless ``allow_extra``: silently
    ignoring it would train without what the user meant to give."""
    if not isinstance(row, dict):
        errors.append(f"{where}: expected a JSON object, got {type(row).__name__}")
        return None
    n_before = len(errors)
    if not allow_extra:
        errors += [f"{where}: {_unknown_key_message(k)}" for k in extra_keys(row)]
    query = row.get("query")
    if query is None:
        errors.append(f"{where}: field 'query': missing")
    elif not isinstance(query, str):
        errors.append(f"{where}: field 'query': expected a string, got {type(query).__name__}")
    elif not query.strip():
        errors.append(f"{where}: field 'query': empty")
    positives = _str_list(row.get("positive"), "positive", where, errors, required=True)
    negatives = _str_list(row.get("negative"), "negative", where, errors, required=False)
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        errors.append(f"{where}: field 'instruction': expected a string")
    pos_scores, neg_scores = _teacher_scores(row, positives, negatives, where, errors)
    if len(errors) > n_before:
        return None
    return Example(
        query=query,
        positives=positives,
        negatives=negatives,
        instruction=instruction.strip() or None if isinstance(instruction, str) else None,
        task=task,
        source=where,
        pos_scores=pos_scores,
        neg_scores=neg_scores,
    )


def _numbers(value, name: str, expected: int, where: str, errors: list[str]):
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        errors.append(f"{where}: field {name!r}: expected a list of finite numbers")
        return None
    if len(value) != expected:
        errors.append(f"{where}: field {name!r}: {len(value)} scores for {expected} texts")
        return None
    return tuple(float(v) for v in value)


def _teacher_scores(row: dict, positives, negatives, where: str, errors: list[str]):
    """Teacher scores (distillation): ``pos_scores`` / ``neg_scores`` (FlagEmbedding's names)
    aligned with ``positive`` / ``negative``, or one ``scores`` list for both, in that order."""
    if not any(k in row for k in ("scores", "pos_scores", "neg_scores")):
        return None, None
    if "scores" in row and ("pos_scores" in row or "neg_scores" in row):
        errors.append(f"{where}: field 'scores': give scores, or pos_scores and neg_scores")
        return None, None

    def count(value) -> int:
        return 1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0

    blank = count(row.get("positive")) != len(positives) or count(row.get("negative")) != len(
        negatives
    )
    if blank:
        errors.append(f"{where}: field 'positive'/'negative': an empty text has a teacher score")
        return None, None
    if "scores" in row:
        both = _numbers(row["scores"], "scores", len(positives) + len(negatives), where, errors)
        return (None, None) if both is None else (both[: len(positives)], both[len(positives) :])
    pos = _numbers(row["pos_scores"], "pos_scores", len(positives), where, errors) if (
        "pos_scores" in row) else None  # fmt: skip
    neg = _numbers(row["neg_scores"], "neg_scores", len(negatives), where, errors) if (
        "neg_scores" in row) else None  # fmt: skip
    return pos, neg


def read_task_file(
    path: str | Path,
    task: str | None = None,
    registry: TaskRegistry | None = None,
    allow_extra: bool = False,
) -> list[Example]:
    """Read and validate one task file. With a registry, rows of a task the registry does not
    know must carry an ``instruction``. Raises :class:`DataError` listing every problem; with
    ``allow_extra``, unknown keys are ignored and their count logged."""
    path = Path(path)
    task = task or task_name(path)
    examples: list[Example] = []
    errors: list[str] = []
    needs_instruction = registry is not None and registry.instruction(task) is None
    extra_rows, extra_names = 0, set()
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json_line(where, line)
                except DataError as err:
                    errors.append(str(err))
                    continue
                ex = parse_row(row, where, task, errors, allow_extra)
                if allow_extra and isinstance(row, dict) and extra_keys(row):
                    extra_rows += 1
                    extra_names.update(extra_keys(row))
                if ex is not None and needs_instruction and ex.instruction is None:
                    errors.append(
                        f"{where}: field 'instruction': missing, and task {task!r} has no "
                        "registry entry (add one with --task_config, or an instruction per row)"
                    )
                    continue
                if ex is not None:
                    examples.append(ex)
                if len(errors) >= MAX_REPORTED_ERRORS:
                    break
    except (OSError, EOFError, UnicodeDecodeError) as err:
        errors.append(f"{path}: cannot read: {err}")
    if errors:
        raise DataError(problems_message(errors, "training data"))
    if not examples:
        raise DataError(f"{path}: no examples")
    if extra_rows:
        log.warning("%s: %d row(s) carry keys the trainer ignores (%s): --allow_extra_fields",
                    path, extra_rows, ", ".join(sorted(extra_names)))  # fmt: skip
    return examples


def problems_message(errors: list[str], what: str) -> str:
    """One problem: its own line. Several: a count, then one line each (at most 20)."""
    if len(errors) == 1:
        return errors[0]
    more = " (stopped after the first 20)" if len(errors) >= MAX_REPORTED_ERRORS else ""
    return f"{len(errors)} problems in {what}{more}:\n" + "\n".join(errors)


def load_training_data(
    source: str | Path, registry: TaskRegistry, allow_extra: bool = False
) -> dict[str, list[Example]]:
    """A folder of task files (or one file) -> {task: examples}, all validated."""
    source = Path(source)
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    else:
        raise DataError(f"{source}: training data not found")
    if not files:
        raise DataError(f"{source}: no .jsonl or .jsonl.gz files")
    data: dict[str, list[Example]] = {}
    problems: list[str] = []
    for path in files:
        task = task_name(path)
        if task in data:
            problems.append(f"{path}: task {task!r} appears twice (.jsonl and .jsonl.gz?)")
            continue
        try:
            data[task] = read_task_file(path, task, registry, allow_extra)
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("\n".join(problems))
    return data


# --- sampling ------------------------------------------------------------------------------------

Slot = tuple[str, int]  # (task, row index)


class EpochSampler:
    """Deterministic per-epoch plan of global batches; see the module docstring."""

    def __init__(
        self,
        task_sizes: dict[str, int],
        weights: dict[str, float],
        global_batch_size: int,
        seed: int = 42,
        batch_same_task: bool = True,
    ):
        # {task: TaskTopics}: set by the training setup when data.topic_rows > 0 (the topics
        # need the teacher's vectors, built after the plan's length is known); rows of a task
        # with topics are ordered topic by topic (``data.topics``), which rows are not changed
        self.topics: dict[str, TaskTopics] = {}
        self.task_sizes = dict(sorted(task_sizes.items()))
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.task_sizes}
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.batch_same_task = batch_same_task
        if len(self) == 0:
            raise DataError(
                f"no full batch of {global_batch_size} rows can be formed "
                f"(rows per task after weighting: {self.epoch_counts()}); lower the batch size"
            )

    def epoch_counts(self) -> dict[str, int]:
        return {t: round(self.weights[t] * n) for t, n in self.task_sizes.items()}

    def __len__(self) -> int:
        """Global batches per epoch (the same every epoch)."""
        counts = self.epoch_counts().values()
        if self.batch_same_task:
            return sum(c // self.global_batch_size for c in counts)
        return sum(counts) // self.global_batch_size

    def _task_rows(self, task: str, rng: random.Random) -> list[int]:
        n, w = self.task_sizes[task], self.weights[task]
        whole = int(math.floor(w))
        rows = list(range(n)) * whole
        rows += rng.sample(range(n), round(w * n) - whole * n)
        rng.shuffle(rows)
        return rows

    def batches(self, epoch: int) -> list[list[Slot]]:
        rng = random.Random(f"{self.seed}:{epoch}:plan")
        per_task = {t: self._task_rows(t, rng) for t in self.task_sizes}
        for task, topics in self.topics.items():
            per_task[task] = topic_order(per_task[task], topics, rng)
        size = self.global_batch_size
        if self.batch_same_task:
            out = [
                [(t, i) for i in rows[k : k + size]]
                for t, rows in per_task.items()
                for k in range(0, len(rows) - size + 1, size)
            ]
        else:
            flat = [(t, i) for t, rows in per_task.items() for i in rows]
            rng.shuffle(flat)
            out = [flat[k : k + size] for k in range(0, len(flat) - size + 1, size)]
        rng.shuffle(out)
        return out


@dataclass
class TrainItem:
    """One slot of a batch, as text: the model formats and tokenizes it (:func:`collate`)."""

    query: str
    instruction: str | None  # the row's own, else its task's registry instruction
    positive: str
    negatives: list[str]
    teacher: list[float] | None = None  # scores of [positive, *negatives], when the row has them


def draw_item(
    ex: Example,
    n_negative: int,
    rng: random.Random,
    fallback_pool: Sequence[Example],
) -> tuple[str, list[str], list[float] | None]:
    """One positive and ``n_negative`` negatives for this slot (see module docstring), and the
    teacher scores of exactly those (None unless the row carries scores for both)."""
    p = rng.randrange(len(ex.positives))
    positive = ex.positives[p]
    pool = list(range(len(ex.negatives)))
    borrowed: list[str] = []
    if n_negative and not pool:
        others = [o for o in fallback_pool if o.positives != ex.positives]
        borrowed = [
            rng.choice(o.positives) for o in rng.sample(others, min(len(others), n_negative))
        ]
        borrowed = borrowed or [positive]  # a one-row task: nothing else exists
        pool = list(range(len(borrowed)))
    picked: list[int] = []
    while len(picked) < n_negative:
        block = pool[:]
        rng.shuffle(block)
        picked += block[: n_negative - len(picked)]
    texts = borrowed or list(ex.negatives)
    negatives = [texts[i] for i in picked]
    teacher = None
    if ex.pos_scores is not None and ex.neg_scores is not None and not borrowed:
        teacher = [ex.pos_scores[p], *(ex.neg_scores[i] for i in picked)]
    return positive, negatives, teacher


def build_items(
    slots: Sequence[Slot],
    data: dict[str, list[Example]],
    registry: TaskRegistry,
    n_negative: int,
    seed: int,
    epoch: int,
    batch_index: int,
    slot_offset: int = 0,
) -> list[TrainItem]:
    """Training items for some slots of one global batch (a rank's slice)."""
    items = []
    for k, (task, row) in enumerate(slots):
        ex = data[task][row]
        rng = random.Random(f"{seed}:{epoch}:{batch_index}:{slot_offset + k}")
        positive, negatives, teacher = draw_item(ex, n_negative, rng, data[task])
        instruction = ex.instruction or registry.instruction(task)
        items.append(TrainItem(ex.query, instruction, positive, negatives, teacher))
    return items


def text_ids(texts: Sequence[str]) -> list[int]:
    """Stable 63-bit ids of texts, to spot identical documents across devices."""
    import hashlib

    return [
        int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1
        for t in texts
    ]


def collate(items: Sequence[TrainItem], model, with_teacher: bool = False) -> dict:
    """Format and tokenize a rank's items the way ``model`` (an Embedder) encodes text: its
    prompt format, its lengths, its tokenizer, so training sees exactly what encoding will.
    Documents are laid out as ``[positives (B), negatives of query 0, negatives of query 1,
    ...]``, so query i's positive is document i."""
    import torch

    settings = model.settings
    queries = [model.format([it.query], "query", it.instruction)[0] for it in items]
    docs = model.format(
        [it.positive for it in items] + [n for it in items for n in it.negatives], "passage"
    )
    q = model.tokenize(queries, settings.query_max_length)
    d = model.tokenize(docs, settings.doc_max_length)
    batch = {
        "query": {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"]},
        "doc": {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]},
        "doc_text_ids": torch.tensor(text_ids(docs), dtype=torch.int64),
    }
    if with_teacher:  # [B, 1 + n]: each query's teacher scores of its positive and negatives
        missing = [i for i, it in enumerate(items) if it.teacher is None]
        if missing:
            raise DataError(
                "distillation needs teacher scores (pos_scores and neg_scores, or scores) on "
                f"every row with hard negatives; {len(missing)} item(s) of this batch have none"
            )
        batch["teacher_scores"] = torch.tensor([it.teacher for it in items], dtype=torch.float64)
    return batch
