"""Files the pipeline writes: whole or not at all, and never over a user's file by surprise.

* :func:`atomic_files` stages several outputs and renames them into place together when the
  block ends cleanly (``os.replace`` is atomic on one filesystem), so a reader never sees half a
  file and a failed run leaves nothing behind;
* :func:`write_json` writes strict JSON (NaN and infinities as null) the same way;
* :func:`refuse_existing` is the rule every writer follows: an output that already exists is
  an error naming it, unless the user passed ``--overwrite``;
* :func:`open_text` reads ``.gz`` and plain text alike; :func:`json_line` parses one JSONL line
  into a one-line error naming the file, line and column when it is not JSON.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conretriever.errors import DataError, UserError


def open_text(path: Path):
    """A text handle on ``path`` (gzip-decoded when the name ends in ``.gz``), UTF-8."""
    if Path(path).name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def json_line(where: str, line: str):
    """The JSON value on one line of a JSONL file; ``where`` is ``"path:lineno"``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None


@contextmanager
def atomic_files() -> Iterator[Callable[[Path], Path]]:
    """Output files that appear together and whole, or not at all.

    ``stage(final)`` returns the hidden sibling ``.<name>.tmp`` to write instead of ``final``.
    When the block ends cleanly every staged file is renamed onto its final name; when it
    raises, the staged files are deleted and no final file is touched.
    """
    staged: list[tuple[Path, Path]] = []

    def stage(final: Path) -> Path:
        tmp = final.with_name(f".{final.name}.tmp")
        staged.append((tmp, final))
        return tmp

    try:
        yield stage
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # a no-op for those already renamed


def strict_json(obj):
    """A JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy / torch scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj, indent: int | None = 2) -> None:
    """Strict JSON to ``path``, written to a temporary file and renamed (whole or absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(strict_json(obj), indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)


def refuse_existing(paths: list[Path], overwrite: bool, what: str = "output") -> None:
    """An existing output is never replaced by surprise: an error naming it, unless
    ``overwrite`` (the ``--overwrite`` flag)."""
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise UserError(
            f"{what} {existing[0]} already exists"
            + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
            + "; pass --overwrite to replace it"
        )
