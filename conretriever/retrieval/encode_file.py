"""``conretriever encode``: a text file (one text per line) or a JSONL field -> a ``.npy`` matrix.

The model options are the ones ``train`` has (``--query_max_length``, ``--doc_max_length``,
``--truncate_dim``, ``--pooling``...: the ``EmbedderSettings``); the role's length applies.
Rows of the output follow the input's non-blank lines; vectors are float32, L2-normalised when
the model normalises. Under ``torchrun`` the texts are split over the ranks
(``retrieval.search.encode_sharded``) and rank 0 writes the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from conretriever import runtime
from conretriever.errors import DataError
from conretriever.files import json_line, open_text, output_file, refuse_existing, writing
from conretriever.model.settings import EmbedderSettings
from conretriever.options import opt, output_opt


@dataclass
class EncodeSettings:
    model: str | None = opt(None, required=True, help="model spec (dir, hub id, embedded:...)")
    input: Path | None = opt(None, required=True, help="text file (one per line) or .jsonl")
    output: Path | None = output_opt(None, required=True, help=".npy file to write")
    overwrite: bool = opt(False, help="replace an existing --output")
    field: str = opt("text", help="the JSONL field to encode")
    role: Literal["query", "passage"] = opt("passage", help="queries get the instruction")
    instruction: str | None = opt(None, help="query instruction (none: the model's default)")
    batch_size: int = opt(256, ge=1, help="most texts per forward (the token budget binds first)")
    embedder: EmbedderSettings = opt(default_factory=EmbedderSettings)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", help="auto: bf16 where the device computes it natively"
    )
    progress: bool = opt(True, help="progress while encoding")


def read_texts(path: Path, field: str) -> list[str]:
    """Non-blank lines of a text file, or ``field`` of each JSONL row (``.jsonl[.gz]``)."""
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    texts = []
    try:
        with open_text(path) as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if not jsonl:
                    texts.append(line.rstrip("\n"))
                    continue
                row = json_line(f"{path}:{lineno}", line)
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise DataError(f"{path}:{lineno}: field {field!r}: missing or not a string")
                texts.append(row[field])
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def run(settings: EncodeSettings) -> int:
    from conretriever.model.embedder import Embedder
    from conretriever.retrieval.corpus import encode_sharded

    info = runtime.init_distributed()
    output_file(settings.output, "--output")
    refuse_existing([settings.output], settings.overwrite)
    texts = read_texts(settings.input, settings.field)
    model = Embedder.from_pretrained(
        settings.model, settings.embedder, dtype=settings.dtype, device=info.device
    )
    vectors = encode_sharded(
        model,
        texts,
        role=settings.role,
        instruction=settings.instruction,
        batch_size=settings.batch_size,
        show_progress=settings.progress,
    )
    if info.is_main:
        tmp = settings.output.with_name(f".{settings.output.name}.tmp")
        try:
            with writing(settings.output, "--output"):
                settings.output.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as handle:
                    np.save(handle, vectors)
                tmp.replace(settings.output)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk: no half .npy left beside the output
        print(f"wrote {vectors.shape} to {settings.output}")
    return 0
