"""Append-only JSONL record logs that survive being killed at any instant.

Every answered request becomes one line ``{"id": ..., ...}`` in a log file. The id is a pure
function of the request (family, task, sample index, seed), so a restarted run reads the log,
skips ids that are already there, and asks only for the rest: nothing is lost, nothing is asked
twice, and the final file does not depend on where the run was killed.

Why this is safe against ``kill -9``:

* a record is encoded to one complete line and handed to the kernel with a single ``os.write``
  on an ``O_APPEND`` descriptor (no user-space buffer to lose), then ``fsync``-ed;
* the only damage a kill can do is a final line without its newline. On reopen that tail is cut
  off (``truncate`` to the last newline) before anything new is appended, so a half line can never
  be glued to the next record. Readers likewise ignore an unterminated last line;
* files derived from the logs (task lists, training JSONL) are written to a temporary file and
  renamed into place, so they are either the old version or the new one, never half of each.

A malformed line *inside* a log is not a crash artefact; it is reported with file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from conretriever.errors import DataError
from conretriever.files import writing


class StoreError(DataError):
    """A log or input file is malformed; the message names file and line."""


def dedup_key(text: str) -> str:
    """Duplicate-detection key: NFKC, case-folded, whitespace collapsed, edge punctuation cut."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" .!?;:,\"'`")


def text_hash(text: str, n: int = 12) -> str:
    """Short stable hash of normalised text (ids must not change across runs or machines)."""
    return hashlib.sha1(dedup_key(text).encode("utf-8")).hexdigest()[:n]


def request_seed(request_id: str) -> int:
    """The sampling seed sent with a request: a 31-bit hash of its id (servers want an int32)."""
    return int(hashlib.sha1(request_id.encode("utf-8")).hexdigest()[:8], 16) % 2**31


def read_jsonl(path: str | Path, *, allow_partial_tail: bool = True) -> list[dict]:
    """All complete records of ``path`` ([] if absent). An unterminated last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else an unterminated line
    if tail.strip() and not allow_partial_tail:
        raise StoreError(f"{path}:{len(lines) + 1}: last line has no newline (truncated file?)")
    records = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}:{lineno}: not valid JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise StoreError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


class AppendLog:
    """An append-only JSONL file; one ``append`` = one durable, complete line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = -1
        with writing(self.path):  # a read-only or full output folder: one line naming the log
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_tail(self) -> None:
        """Cut an unterminated last line left by a killed writer."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
        view = memoryview(line)
        with writing(self.path):  # the log keeps every complete line written before
            while view:  # os.write on a regular file writes everything unless the disk is full
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Write ``records`` to ``path`` via a temporary file and a rename; returns the count. On a
    failure (a full disk) the old ``path`` stays and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    n = 0
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n += 1
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n
