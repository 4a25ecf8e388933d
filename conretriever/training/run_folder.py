"""The run folder (``--output``): one run per folder, never mixed with another.

A run records who it is in ``run.json`` (a random ``run_id``, kept across resumes) and what it
is in ``config.yaml``. When a run starts (rank 0 decides, the other ranks are told):

* a folder that holds another run's outputs (``run.json``, ``config.yaml``, checkpoints or
  ``final/``) is refused, naming the folder, unless ``--overwrite_output_dir true`` (which
  removes what a run writes there, and nothing else) or ``--resume``;
* ``--resume true`` compares the saved config with the new one and refuses if any setting that
  changes the trajectory differs (``training.config.trajectory``: model, LoRA, data, batch,
  schedule, learning rate, temperature, seed, lengths, negatives...), listing each as
  ``field: old -> new``; ``--resume force`` accepts the change, applies the NEW values
  (scheduler included) and says so;
* a new run that fails before its first step (data that does not load, a model that does
  not) removes the records it wrote, so the corrected command runs in the same folder;
* a lock (``.lock``, held while the run lives) refuses a second run writing to the same folder
  at the same time, which also makes leftovers of killed runs (``checkpoint-*.tmp``,
  ``final.tmp``) safe to remove: no live process owns them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from conretriever import runtime
from conretriever.errors import ConfigError, UserError
from conretriever.files import output_folder, read_json, write_text, writing
from conretriever.options import load_yaml
from conretriever.training.config import TrainSettings, trajectory

log = logging.getLogger("conretriever.run")

RUN_FILE = "run.json"
# What a run (and the training script around it) writes into its folder; --overwrite_output_dir
# removes these and leaves anything else alone.
RUN_OUTPUTS = (
    "config.yaml",
    RUN_FILE,
    "tasks_resolved.json",
    "metrics.jsonl",
    "trainer_state.json",
    "tensorboard",
    "final",
    "final.tmp",
    "comparison.md",
    "report",
)
RUN_OUTPUT_GLOBS = ("checkpoint-*", "export-*", "eval_*")


@dataclass
class RunFolder:
    path: Path
    run_id: str
    resumed: bool  # a previous run of this id exists here (resume true/force)
    changes: dict[str, tuple]  # with resume force: field -> (old, new)
    _lock: object = None

    def release_unstarted(self) -> None:
        """Undo the claim of a new run that failed before its first step (bad data, a model
        that does not load): remove the records it wrote (``run.json``, ``config.yaml``,
        ``tasks_resolved.json``, an empty ``metrics.jsonl``), so that the corrected command
        runs in the same folder without ``--overwrite_output_dir``. A resumed run keeps its
        records; rank 0 alone writes them, so rank 0 alone removes them."""
        if self.resumed or not runtime.is_main():
            return
        metrics = self.path / "metrics.jsonl"
        written = [self.path / RUN_FILE, self.path / "config.yaml",
                   self.path / "tasks_resolved.json"]  # fmt: skip
        if metrics.is_file() and metrics.stat().st_size == 0:
            written.append(metrics)
        for path in written:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only folder: the error that stopped the run is what matters
                log.warning("could not remove %s", path)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _outputs(out: Path) -> list[Path]:
    found = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    for pattern in RUN_OUTPUT_GLOBS:
        found += sorted(out.glob(pattern))
    return found


def _holds_a_run(out: Path) -> list[str]:
    names = [p.name for p in _outputs(out) if p.name in ("config.yaml", RUN_FILE, "final")]
    names += [p.name for p in out.glob("checkpoint-*") if p.is_dir()]
    return sorted(set(names))


def _lock(out: Path):
    handle = open(out / ".lock", "a+")  # noqa: SIM115 - held open for the run's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{out}: another run is writing to this folder ({owner})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return handle


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of killed runs: safe to delete, we hold the folder's lock."""
    for tmp in [*out.glob("checkpoint-*.tmp"), *out.glob("export-*.tmp"), out / "final.tmp"]:
        if tmp.exists():
            log.info("removing %s, left by a run that was killed", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


# settings that decide which weights a checkpoint holds: even --resume force cannot change them
CHECKPOINT_SHAPE = (
    "model.model_name_or_path",
    "model.use_lora",
    "model.keep_layers",
    "model.freeze_embeddings",
    "model.lora.r",
    "model.lora.target_modules",
    "model.lora.top_layers",
)


def _differences(old: dict, new: dict) -> dict[str, tuple]:
    # A setting added since the run was saved is absent from its config.yaml: the run used
    # that setting's default (the behaviour before it existed), so it reads as the default.
    a = {**trajectory(TrainSettings().to_dict()), **trajectory(old)}
    b = trajectory(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _shape_changes(changes: dict[str, tuple], new: dict) -> list[str]:
    """The changed settings that decide which weights a checkpoint holds: CHECKPOINT_SHAPE's,
    and vector distillation's learned projection (whether the model has one, and the teacher
    whose width it has)."""
    fixed = [k for k in changes if k in CHECKPOINT_SHAPE]
    vector, teacher = "loss.embed_distil_vector_weight", "loss.embed_distil_model"
    if vector in changes and bool(changes[vector][0]) != bool(changes[vector][1]):
        fixed.append(vector)
    elif teacher in changes and trajectory(new).get(vector):
        fixed.append(teacher)
    return fixed


def _decide(cfg: TrainSettings) -> dict:
    """Rank 0: check the folder and prepare it; returns what every rank needs to know."""
    out = Path(cfg.train.output)
    out.mkdir(parents=True, exist_ok=True)
    mode = cfg.train.resume
    held = _holds_a_run(out)
    saved_config = out / "config.yaml"
    if mode != "false" and (out / RUN_FILE).exists() and saved_config.exists():
        record = read_json(out / RUN_FILE)
        if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
            raise ConfigError(f"{out / RUN_FILE}: no run_id; not a run record")
        run_id = record["run_id"]
        old = load_yaml(saved_config, "saved run config") or {}
        if not isinstance(old, dict):
            raise ConfigError(f"{saved_config}: the top level must be a mapping of settings")
        changes = _differences(old, cfg.to_dict())
        fixed = _shape_changes(changes, cfg.to_dict())
        if fixed and mode == "force":
            listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
            raise ConfigError(
                f"{out}: --resume force cannot change what the checkpoints' weights are ("
                f"{listed}): they would load partly or not at all; start a new run instead"
            )
        if changes and mode == "true":
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise ConfigError(
                f"{out}: --resume true with changed settings ({listed}); resume with the saved "
                "settings, or pass --resume force to continue with the new ones"
            )
        return {"run_id": run_id, "resumed": True, "changes": changes}
    if held and mode == "false":
        if not cfg.train.overwrite_output_dir:
            raise ConfigError(
                f"{out} holds another run ({', '.join(held)}); pass --resume true to continue "
                "it, or --overwrite_output_dir true to start afresh there (removes its outputs)"
            )
        for path in _outputs(out):
            log.info("--overwrite_output_dir: removing %s", path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif held:  # resume asked, but the folder holds no run.json/config.yaml to compare with
        raise ConfigError(
            f"{out} holds run outputs ({', '.join(held)}) but no {RUN_FILE}/config.yaml to "
            "resume from; use --overwrite_output_dir true to start afresh"
        )
    elif mode != "false":
        log.info("--resume %s: no run in %s yet, starting from scratch", mode, out)
    run_id = uuid.uuid4().hex[:12]
    write_text(
        out / RUN_FILE,
        json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n",
    )
    return {"run_id": run_id, "resumed": False, "changes": {}}


def prepare(cfg: TrainSettings) -> RunFolder:
    """Check and claim ``cfg.train.output`` for this run (collective)."""
    import torch

    out = Path(cfg.train.output)
    decision: dict | str = {}
    lock = None
    if runtime.is_main():
        try:
            # A file at --output, a read-only folder or a full disk: one line naming the
            # folder, before the data and model are loaded (files.output_folder/writing).
            output_folder(out, "--output")
            with writing(out, "--output"):
                out.mkdir(parents=True, exist_ok=True)
                lock = _lock(out)
                _remove_leftovers(out)
                decision = _decide(cfg)
                cfg.save(out / "config.yaml")
        except UserError as err:
            decision = f"{type(err).__name__}:{err}"
    if runtime.is_distributed():
        box = [decision]
        torch.distributed.broadcast_object_list(box, src=0)
        decision = box[0]
    if isinstance(decision, str):  # every rank fails the same way, with the same message
        if lock is not None:
            lock.close()
        kind, _, message = decision.partition(":")
        raise (ConfigError if kind == "ConfigError" else UserError)(message)
    folder = RunFolder(out, decision["run_id"], decision["resumed"], decision["changes"], lock)
    if folder.changes and runtime.is_main():
        for key, (old, new) in folder.changes.items():
            log.warning("--resume force: %s: %r -> %r (the new value applies)", key, old, new)
    return folder
