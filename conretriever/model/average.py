"""Weight averaging of saved model folders: ``conretriever average A B C --output OUT``.

Averaging the weights of several points of one training run (the last checkpoints, as
EmbeddingGemma's recipe does), or of runs that started from the same base model (LM-Cocktail's
merging), gives a model that usually generalises better than any one of them: the average sits
in a flatter region of the loss than the points it is made of.

The inputs are folders written by ``Embedder.save`` (``final/``, or the ``export-<step>/``
folders that ``train --export_steps N`` writes): their weights are the merged ones (LoRA folded
in), so averaging them averages the models themselves. (Averaging LoRA's ``A`` and ``B``
factors separately would not: the mean of products is not the product of means.)

Every folder must hold the same model: the same tensor names, shapes and dtypes, the same
embedder settings (``conretriever.json``) and architecture config; anything else is refused with
one line naming the folder. The average is computed in float32 one tensor at a time (``weights``
optional, normalised to sum to 1), cast back to each tensor's dtype, and written with the first
folder's tokenizer, config and sentence-transformers files, through a temporary folder renamed
at the end: the output is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from conretriever.errors import ConfigError, DataError
from conretriever.files import output_folder, refuse_existing, writing
from conretriever.options import opt, output_opt

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# files that decide what the weights mean: they must agree across the averaged folders
MUST_AGREE = ("conretriever.json", "config.json", "tokenizer.json")


@dataclass
class AverageSettings:
    """``conretriever average`` flags."""

    models: list[str] = opt(
        default_factory=list,
        positional=True,
        commas="path",
        metavar="MODEL_DIR",
        help="saved model folders",
    )
    output: str | None = output_opt(None, required=True, help="the averaged model (a folder)")
    weights: list[float] = opt(
        default_factory=list, ge=0, help="one per model (default: equal), normalised to sum 1"
    )
    overwrite: bool = opt(False, help="replace an existing --output")

    def validate(self) -> None:
        if len(self.models) < 2:
            raise ConfigError(f"average: give at least two model folders, got {len(self.models)}")
        if self.weights and len(self.weights) != len(self.models):
            raise ConfigError(
                f"--weights: {len(self.weights)} weights for {len(self.models)} model folders"
            )
        if self.weights and sum(self.weights) <= 0:
            raise ConfigError("--weights: they sum to 0")


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise DataError(f"{index}: not a safetensors index ({err})") from None
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if not single.exists():
        raise DataError(f"{folder}: no model.safetensors (not a saved model folder)")
    return [single]


def _open(folder: Path) -> dict:
    """Tensor name -> (file, dtype, shape) of a model folder, read from the headers only."""
    from safetensors import safe_open

    found = {}
    for path in _shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    found[name] = (path, sl.get_dtype(), tuple(sl.get_shape()))
        except (OSError, ValueError, RuntimeError) as err:  # safetensors' header errors
            raise DataError(f"{path}: cannot read the weights ({err})") from None
    return found


def _check_same(folders: list[Path], tables: list[dict]) -> None:
    first, table0 = folders[0], tables[0]
    for folder, table in zip(folders[1:], tables[1:], strict=True):
        if set(table) != set(table0):
            odd = sorted(set(table) ^ set(table0))[0]
            raise DataError(f"{folder}: its tensors differ from {first}'s (e.g. {odd!r})")
        for name, (_, dtype, shape) in table.items():
            if (dtype, shape) != table0[name][1:]:
                raise DataError(
                    f"{folder}: tensor {name!r} is {dtype} {list(shape)}, in {first} "
                    f"{table0[name][1]} {list(table0[name][2])}"
                )
        for file in MUST_AGREE:
            a, b = first / file, folder / file
            if a.exists() != b.exists() or (a.exists() and a.read_bytes() != b.read_bytes()):
                raise DataError(f"{folder}: {file} differs from {first}'s: not the same model")


def average_folders(models: list[str | Path], output: str | Path,
                    weights: list[float] | None = None) -> Path:  # fmt: skip
    """Average the weights of ``models`` into the folder ``output`` (see the module docstring)."""
    import torch
    from safetensors import safe_open

    from conretriever.model.export import _write_safetensors

    folders = [Path(m) for m in models]
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder")
    tables = [_open(f) for f in folders]
    _check_same(folders, tables)
    w = list(weights) if weights else [1.0] * len(folders)
    w = [x / sum(w) for x in w]
    handles: dict[Path, object] = {}
    averaged = {}
    try:
        for name in tables[0]:
            total = None
            for table, share in zip(tables, w, strict=True):
                path = table[name][0]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt").__enter__()
                tensor = handles[path].get_tensor(name)
                if not tensor.is_floating_point():  # e.g. position ids: must be equal
                    total = tensor if total is None else total
                    continue
                part = tensor.float() * share
                total = part if total is None else total + part
            averaged[name] = total.to(tensor.dtype) if total.is_floating_point() else total
            if not torch.isfinite(averaged[name].float()).all():
                raise DataError(f"tensor {name!r} is not finite in the average; output not written")
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    skip = shutil.ignore_patterns(*WEIGHT_FILES, "model-*.safetensors")
    shutil.copytree(folders[0], tmp, ignore=skip)
    _write_safetensors(averaged, tmp)
    (tmp / "averaged_from.json").write_text(json.dumps(
        {"models": [str(f) for f in folders], "weights": w}, indent=2) + "\n")  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def run(settings: AverageSettings) -> int:
    """``conretriever average``."""
    out = output_folder(settings.output, "--output")  # a file there: refused, not deleted
    refuse_existing([out], settings.overwrite, "averaged model")
    with writing(out, "--output"):
        path = average_folders(settings.models, out, settings.weights or None)
    print(f"averaged {len(settings.models)} models into {path}")
    return 0
