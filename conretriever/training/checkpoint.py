"""Checkpoints: a run's exact state on disk, written whole, read back without running code.

``checkpoint-<step>/`` holds

* ``state/``: the trainable weights and the optimizer state, sharded by
  ``torch.distributed.checkpoint`` (DCP; each rank writes its own shard). Frozen base weights are
  not stored (14 GB per checkpoint for a 7B model with LoRA, for nothing): they come from the
  model spec on resume;
* ``rng_rank<r>.pt``: each rank's RNG states (torch CPU/CUDA byte tensors, Python's ``random``
  state as a tuple of ints);
* ``trainer_state.json``: step, scheduler state, world size and the run's id.

It is written into ``checkpoint-<step>.tmp`` and renamed when every rank has finished, so a
checkpoint is complete or absent. Rotation (``save_total_limit``) deletes only the oldest
checkpoints of the current run (``run_id``), never another run's.

**Nothing is unpickled freely.** RNG files are read with ``torch.load(weights_only=True)``
(tensors and plain Python values only), DCP's own non-tensor entries are read by DCP with
``weights_only=True``, and DCP's index file (``state/.metadata``, a pickle of DCP's metadata
classes) is read by :class:`SafeReader`, whose unpickler accepts only those classes, ``torch.Size``,
dtypes and layouts, and paths; anything else (``os.system``...) is refused. A crafted checkpoint
folder therefore cannot run code.

On resume, :func:`latest_loadable` checks the newest checkpoint of this run (its files parse, every
tensor shard is as long as the index says, every rank's RNG file is there) and falls back, with a
warning, to the previous complete one when it cannot be read; :func:`load` reports damage the
checks cannot see (bytes flipped inside a shard) as :class:`Unreadable`, and the training loop
then falls back the same way. When this run's checkpoints are all damaged, the resume stops with
one line naming them rather than silently starting again from step 0.

DCP reports a failure in any rank as ``CheckpointException``, which derives from
``BaseException`` (not ``Exception``): :func:`_dcp_errors` turns it back into the underlying
error (an ``OSError`` for a full disk on save) or :class:`Unreadable` on load.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from conretriever import runtime
from conretriever.errors import UserError

log = logging.getLogger("conretriever.checkpoint")


class Unreadable(UserError):
    """A checkpoint whose files exist but cannot be loaded (a truncated or corrupt shard)."""


@contextmanager
def _dcp_errors(path: Path, loading: bool):
    """DCP's ``CheckpointException`` (a ``BaseException`` wrapping each rank's error) as the
    error it wraps: on load, :class:`Unreadable` naming the checkpoint; on save, the first
    rank's ``OSError`` itself (a full disk: the command line reports it as one line)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        errors = [pair[0] for pair in exc.failures.values()]
        first = errors[0] if errors else exc
        if loading:
            # torch's messages run to a paragraph; the first sentence says what broke
            detail = (str(first).strip().splitlines() or [""])[0].split(". ")[0][:160]
            raise Unreadable(
                f"{path}: cannot resume from it: {type(first).__name__}: {detail}"
            ) from None
        for err in errors:
            if isinstance(err, OSError):
                raise err from None
        raise


# ----- reading DCP metadata without running code -------------------------------------------------
class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes DCP's ``.metadata`` pickle is made of."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"):
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) or name == "_MEM_FORMAT_ENCODING":
                return found
        if module == "torch":
            found = getattr(torch, name, None)
            if name == "Size" or isinstance(found, torch.dtype | torch.layout):
                return found
        if (module, name) in {
            ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"),
            ("pathlib", "PureWindowsPath"),
            ("collections", "OrderedDict"),
        }:
            return getattr(__import__(module, fromlist=[name]), name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refused")


def safe_metadata(data: bytes):
    return _MetadataUnpickler(io.BytesIO(data)).load()


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with a restricted unpickler for ``.metadata``."""

        def read_metadata(self, *args, **kwargs):
            metadata = safe_metadata((Path(self.path) / ".metadata").read_bytes())
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


@contextmanager
def _single_process_quiet():
    """DCP warns on every save and load in a single process that it assumes one process,
    which is exactly what a plain ``python -m conretriever train`` is."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        yield


# ----- the folder ---------------------------------------------------------------------------------
def checkpoints(out: Path) -> list[Path]:
    """``checkpoint-<step>`` folders of ``out``, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Loading is non-strict: frozen weights are not in the checkpoint (see the module docstring);
    # load() checks every trainable weight is there.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save(out: Path, step: int, model, optimizer, scheduler, run_id: str, keep: int,
         name: str | None = None, extra: dict | None = None) -> Path:  # fmt: skip
    """Write ``checkpoint-<step>`` (or ``name``; collective: every rank calls it); rotate to
    ``keep`` (-1: keep all) numbered checkpoints of this run. ``extra`` goes into its
    ``trainer_state.json`` (the best-model record). Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = runtime.rank()
    final = out / (name or f"checkpoint-{step}")
    tmp = out / f"{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    runtime.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    with _single_process_quiet(), _dcp_errors(tmp, loading=False):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    torch.save(runtime.rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {
            "step": step,
            "run_id": run_id,
            "scheduler": scheduler.state_dict(),
            "world_size": runtime.world_size(),
            **(extra or {}),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    runtime.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # complete or absent: a resume never sees a partial checkpoint
        rotate(out, run_id, keep)
    runtime.barrier()
    return final


def run_of(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def rotate(out: Path, run_id: str, keep: int) -> None:
    """Delete this run's oldest checkpoints beyond ``keep`` (-1: none); other runs' stay."""
    if keep < 0:
        return
    mine = [p for p in checkpoints(out) if run_of(p) == run_id]
    for old in mine[: max(0, len(mine) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def problem(path: Path, run_id: str, world: int) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it is complete and readable."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "trainer_state.json has no step"
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({err})"
    if state.get("run_id") != run_id:
        return f"written by another run ({state.get('run_id')})"
    if state.get("world_size") != world:
        return (
            f"saved with {state.get('world_size')} processes, resuming with {world}: exact "
            "resume needs the same world size"
        )
    try:
        metadata = safe_metadata((path / "state" / ".metadata").read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        return f"state/.metadata unreadable ({err})"
    if short := _short_shard(path / "state", metadata):
        return short
    for r in range(world):
        try:
            torch.load(path / f"rng_rank{r}.pt", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not this checkpoint"
            return f"rng_rank{r}.pt unreadable ({type(err).__name__}: {err})"
    return None


def _short_shard(state: Path, metadata) -> str | None:
    """A tensor shard missing or shorter than the index says (a copy or a disk that stopped
    half-way): found from the file sizes alone, without reading a tensor."""
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        shard = state / name
        if not shard.is_file():
            return f"state/{name} is missing"
        if (have := shard.stat().st_size) < size:
            return f"state/{name} is truncated ({have} of {size} bytes)"
    return None


def latest_loadable(out: Path, run_id: str, skip: tuple[Path, ...] = ()) -> Path | None:
    """The newest checkpoint of run ``run_id`` that can be resumed from (rank 0 decides and
    tells the others), skipping unreadable ones with a warning each, and those in ``skip``
    (found damaged by :func:`load`).

    When checkpoints are there but none of this run's can be used (every one damaged), that is
    an error naming them: starting from step 0 over a run that had progress would throw it
    away. Checkpoints of other runs do not count (rotation never touches them either)."""
    choice, damaged = None, []
    if runtime.is_main():
        for path in reversed(checkpoints(out)):
            if path in skip:
                damaged.append(path.name)
                continue
            why = problem(path, run_id, runtime.world_size())
            if why is None:
                choice = str(path)
                break
            log.warning("%s: cannot resume from it: %s; trying the previous one", path, why)
            if not why.startswith("written by another run"):
                damaged.append(path.name)
    if runtime.is_distributed():
        box = [(choice, damaged)]
        torch.distributed.broadcast_object_list(box, src=0)
        choice, damaged = box[0]
    if choice is None and damaged:
        raise UserError(
            f"{out}: --resume: no checkpoint of this run can be resumed from (damaged: "
            f"{', '.join(damaged)}; see the warnings above); remove them to restart the run "
            "from step 0, or start afresh with --overwrite_output_dir true"
        )
    return Path(choice) if choice else None


def load(path: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "trainer_state.json").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    sd = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet(), _dcp_errors(path, loading=True):
        dcp.load(sd, storage_reader=_safe_reader(path / "state"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if missing := trainable - set(sd["model"]):
        raise UserError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]}")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=sd["model"],
        optim_state_dict=sd["optim"],
        options=_state_options(strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    runtime.set_rng_state(torch.load(path / f"rng_rank{runtime.rank()}.pt", weights_only=True))
    return int(state["step"])
