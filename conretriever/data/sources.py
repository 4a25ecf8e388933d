"""Sources: where conversion rows come from (local files, the hub, BEIR folders), as a stream.

``conretriever.data.convert`` turns rows into training task files; this module finds and reads them.
Every reader yields ``(where, record)`` pairs: ``where`` is ``file:row``, or on the hub
``name[config/split]:row``, with ``row`` the 1-based record number in that file (for JSONL
without blank lines, the line number), so a problem found downstream names its input row.
Nothing is held in memory whole:

* local files (JSONL, JSON, Parquet, CSV, TSV; JSON also gzipped) and hub datasets are read with
  ``datasets.load_dataset(..., streaming=True)``, so a hub name and a local file take the same
  path. CSV and TSV cells are all read as text, and a header-less TSV (MS MARCO
  ``triples.train.small.tsv``) gets the columns ``query, positive, negative``. ``datasets`` names
  no line for unparsable JSON, so the file is re-read to find it;
* a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) yields one row per
  judged query, in ``queries.jsonl`` order. Positives are the documents with score > 0 (title and
  text joined by a space); negatives are left empty for ``conretriever mine``. Only the documents
  named in the qrels are kept in memory (``conretriever.data.decontam`` reads evaluation sets this
  way);
* ``buffer_shuffle`` is the approximate streaming shuffle that runs before ``--max-examples``.

``resolve_sources`` maps ``--dataset`` / ``--config`` to one ``Source`` per output task: a file or
a BEIR folder is one task; another local folder is a collection whose sub-folders (or file stems)
are configs, the way ``BeastyZ/E5-R`` is organised on the hub (``--config all`` takes each one;
without ``--config`` all its data files form one task, those named after the split if any);
anything that is not a local path is a hub dataset.
"""

from __future__ import annotations

import csv
import gzip
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from conretriever.data.beir import is_beir_dir
from conretriever.errors import DataError
from conretriever.files import json_line

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".tsv")


@dataclass
class Source:
    """One task's input: local data files with one builder, or a hub dataset config."""

    task: str
    label: str  # for messages
    files: list[Path] = field(default_factory=list)
    hub: tuple[str, str | None] | None = None  # (name, config)
    beir_dir: Path | None = None


class SourceSpec(Protocol):
    """What ``resolve_sources`` reads of the settings (``convert.ConvertSettings`` is one)."""

    dataset: str
    config: str | None
    split: str
    layout: str
    task: str | None


# --- reading ------------------------------------------------------------------------------------


def _builder(path: Path) -> tuple[str, dict]:
    """``datasets`` builder name and kwargs for a local data file."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return "json", {}
    if name.endswith(".parquet"):
        return "parquet", {}
    if name.endswith((".csv", ".tsv")):
        # Every column read as text: pandas would turn a query "1984" into an int and an empty
        # cell into NaN; keep_default_na=False keeps "" (which the validator reports as empty).
        kwargs = {"keep_default_na": False}
        if name.endswith(".tsv"):
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
        return "csv", kwargs
    raise DataError(f"{path}: unsupported file type (use one of {', '.join(DATA_SUFFIXES)})")


def first_line(path: Path) -> str:
    """The first line of a (possibly gzipped) text file, without its line ending."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.readline().rstrip("\n\r")


def _string_features(names: list[str]):
    from datasets import Features, Value

    return Features({n: Value("string") for n in names})


def _locate_bad_json(path: Path) -> str:
    """``datasets`` reports unparsable JSON without a line; find it ourselves for the message."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                json_line(f"{path}:{lineno}", line)
            except DataError as err:
                return str(err)
    return f"{path}: cannot be read as JSON lines"


def iter_file(path: Path, layout: str) -> Iterator[tuple[str, dict]]:
    """Stream ``(where, record)`` from one local file through ``datasets``."""
    from datasets import load_dataset

    builder, kwargs = _builder(path)
    if builder == "csv":
        header = next(csv.reader([first_line(path)], delimiter=kwargs.get("delimiter", ",")))
        if layout == "triples":
            names = ["query", "positive", "negative"][: len(header)]
            kwargs.update(header=None, column_names=names)
            header = names
        kwargs["features"] = _string_features(header)
    try:
        stream = load_dataset(
            builder, data_files=[str(path)], split="train", streaming=True, **kwargs
        )
        for row_number, record in enumerate(stream, 1):
            yield f"{path}:{row_number}", record
    except ValueError as err:
        if builder == "json":
            raise DataError(_locate_bad_json(path)) from None
        raise DataError(f"{path}: cannot read: {err}") from None


def iter_hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset

    stream = load_dataset(name, config, split=split, streaming=True)
    label = f"{name}[{config}/{split}]" if config else f"{name}[{split}]"
    for row_number, record in enumerate(stream, 1):
        yield f"{label}:{row_number}", record


def buffer_shuffle(
    items: Iterable[tuple[str, dict]], buffer_size: int, seed: int
) -> Iterator[tuple[str, dict]]:
    """The streaming shuffle ``datasets`` uses (fill a buffer, emit a random slot, refill it), on
    our ``(where, record)`` pairs so row numbers survive. Exact for inputs <= ``buffer_size``."""
    rng = random.Random(seed)
    buffer: list[tuple[str, dict]] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        k = rng.randrange(buffer_size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


# --- locating sources ---------------------------------------------------------------------------


def _data_files(folder: Path, split: str) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    # Hub-style folders name files by split (train-00000-of-00001.parquet, test.jsonl, ...).
    by_split = [p for p in files if p.name.startswith(split)]
    return by_split or files


def _local_configs(folder: Path) -> dict[str, Path]:
    """Config name -> sub-folder or file, for a local collection folder."""
    configs: dict[str, Path] = {}
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            configs[child.name] = child
        elif child.name.endswith(DATA_SUFFIXES):
            stem = child.name
            for suffix in DATA_SUFFIXES:
                if stem.endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
            configs[stem] = child
    return configs


def resolve_sources(settings: SourceSpec) -> list[Source]:
    path = Path(settings.dataset)
    config = settings.config
    if path.exists():
        if path.is_file():
            task = settings.task or path.name.split(".")[0]
            return [Source(task, str(path), files=[path])]
        if settings.layout == "beir" or (settings.layout == "auto" and is_beir_dir(path)):
            return [Source(settings.task or path.name, str(path), beir_dir=path)]
        if config is None:
            files = _data_files(path, settings.split)
            if not files:
                raise DataError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)})")
            return [Source(settings.task or path.name, str(path), files=files)]
        configs = _local_configs(path)
        wanted = list(configs) if config == "all" else [config]
        sources = []
        for name in wanted:
            if name not in configs:
                raise DataError(f"{path}: no config {name!r}; configs: {sorted(configs)}")
            target = configs[name]
            if is_beir_dir(target):
                sources.append(Source(name, str(target), beir_dir=target))
                continue
            files = [target] if target.is_file() else _data_files(target, settings.split)
            sources.append(Source(name, str(target), files=files))
        if settings.task and len(sources) == 1:
            sources[0].task = settings.task
        return sources
    if settings.dataset.startswith(("/", "./", "../", "~")) or settings.dataset.endswith(
        DATA_SUFFIXES
    ):
        raise DataError(
            f"{settings.dataset}: no such file or folder (a hub dataset is named owner/name)"
        )
    # Not a local path: a hub dataset (needs internet).
    if config == "all":
        from datasets import get_dataset_config_names

        names = get_dataset_config_names(settings.dataset)
        return [Source(n, f"{settings.dataset}[{n}]", hub=(settings.dataset, n)) for n in names]
    task = settings.task or config or settings.dataset.rstrip("/").split("/")[-1]
    return [Source(task, settings.dataset, hub=(settings.dataset, config))]
