"""Files the pipeline writes: whole or not at all, and never over a user's file by surprise.

* :func:`atomic_files` stages several outputs and renames them into place together when the
  block ends cleanly (``os.replace`` is atomic on one filesystem), so a reader never sees half a
  file and a failed run leaves nothing behind;
* :func:`write_json` writes strict JSON (NaN and infinities as null) the same way;
* :func:`refuse_existing` is the rule every writer follows: an output that already exists is
  an error naming it, unless the user passed ``--overwrite``;
* :func:`open_text` reads ``.gz`` and plain text alike; :func:`json_line` parses one JSONL line
  into a one-line error naming the file, line and column when it is not JSON, and
  :func:`read_json` does the same for a whole JSON file.

**Where outputs go.** Every command that writes checks its destination before the work starts
(:func:`output_folder`, :func:`output_file`: a file where the folder should be, a folder that
cannot be written to) and does its writing inside :func:`writing`, which turns the operating
system's error (a full disk, a read-only mount, a permission) into a :class:`UserError` naming
the flag, the path and the reason in words (:func:`os_reason`). Together with the
write-then-rename rule above, a failed write leaves the files that were already there as they
were: the failure happens on a temporary sibling, never on the user's file.
"""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conretriever.errors import DataError, UserError


def open_text(path: Path):
    """A text handle on ``path`` (gzip-decoded when the name ends in ``.gz``), UTF-8."""
    if Path(path).name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path: str | Path):
    """The JSON value in the file ``path``; a file that cannot be read or is not JSON is a
    :class:`DataError` naming it (and the line and column)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = os_reason(err) if isinstance(err, OSError) else "not UTF-8 text"
        raise DataError(f"{path}: cannot read: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})"
        ) from None


def json_line(where: str, line: str):
    """The JSON value on one line of a JSONL file; ``where`` is ``"path:lineno"``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None


# What the errors of a write mean for the person who ran the command (os.strerror is terse and
# sometimes misleading: EACCES on a folder reads "Permission denied" with no hint of what to do).
_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "not writable (permission denied)",
    errno.EPERM: "not writable (operation not permitted)",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "a file stands where a folder should be",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or folder",
    errno.EFBIG: "file too large for this filesystem",
}


def os_reason(err: OSError) -> str:
    """The reason of ``err`` in words: ``"disk full"``, ``"not writable (permission denied)"``,
    ... (the system's own text for the rarer errors)."""
    return _REASONS.get(err.errno, err.strerror or type(err).__name__)


def _where(path: Path, err: OSError) -> str:
    """`` (at <file>)`` when the failing file is not ``path`` itself (a file inside it)."""
    name = err.filename
    if name is None or Path(os.fsdecode(name)) == Path(path):
        return ""
    return f" (at {os.fsdecode(name)})"


def output_folder(path: str | Path, flag: str) -> Path:
    """Check that the folder ``path`` (given as ``flag``) can be written, before any work.

    The folder need not exist; its nearest existing ancestor must be a folder (a FILE at
    ``path`` or above it is refused) in which a file can be created: a hidden temporary file
    is created there and removed at once (``O_TMPFILE``: never visible), which is the only
    check that tells the truth about read-only mounts, ACLs and root. Nothing is created, so
    a command that fails later leaves no empty folder behind. A full disk may still let an
    empty file be created; the writes themselves report it (:func:`writing`)."""
    return _check_folder(Path(path), flag, Path(path))


def output_file(path: str | Path, flag: str) -> Path:
    """Check that the file ``path`` (given as ``flag``) can be written: not a folder, and its
    folder writable (:func:`output_folder`). Whether it may be replaced is
    :func:`refuse_existing`'s question."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file")
    _check_folder(path.parent, flag, path)
    return path


def _check_folder(folder: Path, flag: str, named: Path) -> Path:
    """:func:`output_folder`'s check of ``folder``; messages name ``named`` (the flag's value)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(f"{flag} {named}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == named else f"{existing} is a file"
        raise UserError(f"{flag} {named}: {what}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {named}: cannot write in {existing}: {os_reason(err)}") from None
    return folder


@contextmanager
def writing(path: str | Path, flag: str | None = None) -> Iterator[None]:
    """Writes to ``path`` (given as ``flag``, if a flag names it): an operating-system error in
    the block becomes a :class:`UserError` ``<flag> <path>: cannot write: <reason>``. Use it
    around the writes, not around reads of inputs or network calls (a ``ConnectionError`` is an
    ``OSError`` too), so that the message blames the output."""
    try:
        yield
    except OSError as err:
        named = f"{flag} {path}" if flag else str(path)
        raise UserError(
            f"{named}: cannot write{_where(Path(path), err)}: {os_reason(err)}"
        ) from None


def write_text(path: str | Path, text: str) -> None:
    """``text`` to ``path`` via a temporary sibling and a rename: ``path`` is the old file or the
    new one, never a truncated mix (a full disk mid-write leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    write_text(path, json.dumps(strict_json(obj), indent=indent, allow_nan=False) + "\n")


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
