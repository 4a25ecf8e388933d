"""The training loop: ``conretriever train`` (one process) or under ``torchrun`` (FSDP2).

:func:`train` = set up (:func:`setup`: run folder, data, model, optimizer), resume
(:func:`resume`), the steps (:func:`run_steps`), export. One step = one GLOBAL batch from the epoch
plan (``data.training.EpochSampler``): this rank's slice is formatted and tokenized the way the
model encodes (``collate``), then ``step.train_step`` computes the exact full-batch gradient of
the contrastive loss (GradCache), clips it and steps AdamW. The run's position is just the step
number: the plan for every epoch is a pure function of (seed, epoch), so ``step -> (epoch,
batch)`` is all a resume needs besides the model, optimizer and RNG states
(``training.checkpoint``); a resumed run reproduces the uninterrupted one (same losses, same
weights).

The run folder is claimed first (``training.run_folder``: one run per folder, ``--resume``
checks the settings). A step that is not finite updates nothing (``step.train_step``); more than
``max_bad_steps`` of them stop the run with an error naming the step, before any NaN can reach a
checkpoint or ``final/``. The final model is exported with ``Embedder.save`` (LoRA merged;
loads in sentence-transformers).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from conretriever import runtime
from conretriever.data import topics
from conretriever.data.tasks import TaskRegistry
from conretriever.data.training import EpochSampler, build_items, collate, load_training_data
from conretriever.errors import ConfigError, TrainingError
from conretriever.files import writing
from conretriever.model.card import write_card
from conretriever.model.embedder import Embedder
from conretriever.model.settings import EmbedderSettings
from conretriever.precision import describe, use_mixed_bf16
from conretriever.progress import Progress
from conretriever.runtime import DistInfo
from conretriever.training import checkpoint
from conretriever.training.config import TrainSettings
from conretriever.training.distributed import shard_model
from conretriever.training.loss import training_loss
from conretriever.training.monitor import BEST_NAME, Monitor
from conretriever.training.run_folder import RunFolder, prepare
from conretriever.training.step import StepResult, train_step
from conretriever.training.teacher import TeacherTexts, TeacherVectors
from conretriever.training.tracking import RunLog, peak_memory_mb

log = logging.getLogger("conretriever.train")


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then decay.

    Not transformers' ``get_scheduler``, on purpose: its warmup starts at 0 (step 0 of every run
    would update nothing; ours starts at ``1 / warmup``), and ``resume`` needs the factor at an
    arbitrary step for a ``--resume force`` run whose schedule changed, which a closure inside a
    ``LambdaLR`` does not expose. Switching would also change every existing run's trajectory."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _param_dtype(cfg: TrainSettings, info: DistInfo) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    # On a CPU the weights stay fp32 (autocast computes in bf16 where that is native, see
    # conretriever.precision); bf16 weights would also make the optimizer update in bf16.
    # FSDP keeps fp32 shards and computes in bf16 via its policy; one GPU with LoRA can hold the
    # frozen base in bf16 (autocast computes in bf16 anyway); full fine-tuning needs fp32 masters.
    if info.device.type == "cuda" and info.world_size == 1 and cfg.model.use_lora:
        return "bfloat16"
    return "float32"


def build_model(cfg: TrainSettings, info: DistInfo) -> Embedder:
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # LoRA init must be identical on every rank and rerun
    model = Embedder.from_pretrained(
        m.model_name_or_path,
        m.embedder,
        m.lora if m.use_lora else None,
        dtype=_param_dtype(cfg, info),
        device=info.device,
        attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing,
        keep_layers=m.keep_layers,
    )
    if m.freeze_embeddings:
        model.base_model.get_input_embeddings().weight.requires_grad_(False)
    model.train()
    return model


@dataclass(kw_only=True)  # 15 fields: by name only
class Setup:
    """Everything a run needs, built once by :func:`setup`."""

    cfg: TrainSettings
    info: DistInfo
    folder: RunFolder
    registry: TaskRegistry
    data: dict
    sampler: EpochSampler
    total_steps: int
    model: Embedder
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool
    packed: bool
    monitor: Monitor
    teacher: TeacherVectors | None = None  # embedding distillation's teacher vectors

    @property
    def sharded(self) -> bool:
        return self.cfg.train.fsdp if self.cfg.train.fsdp is not None else self.info.world_size > 1

    def autocast(self):
        if self.bf16 and not self.sharded:  # FSDP's policy already computes in bf16
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return nullcontext()


def _data(cfg: TrainSettings, info: DistInfo):
    registry = TaskRegistry.load(cfg.data.task_config)
    data = load_training_data(cfg.data.train_data, registry, cfg.data.allow_extra_fields)
    t = cfg.train
    sampler = EpochSampler(
        {task: len(rows) for task, rows in data.items()},
        {task: registry.weight(task) for task in data},
        t.per_device_train_batch_size * info.world_size,
        seed=t.seed,
        batch_same_task=cfg.data.batch_same_task,
    )
    if cfg.loss.distil_weight > 0:  # every row must carry what distillation reads
        for rows in data.values():
            for ex in rows:
                if ex.pos_scores is None or ex.neg_scores is None or not ex.negatives:
                    raise ConfigError(
                        f"{ex.source}: field 'neg_scores': --distil_weight needs teacher scores "
                        "(pos_scores and neg_scores, or scores) and hard negatives on every row; "
                        "conretriever mine --output_scores writes them (--min_negatives 1 leaves "
                        "out the rows it finds no negative for)"
                    )
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * len(sampler))
    if total < 1:
        raise ConfigError(
            f"this run would train 0 steps (num_train_epochs {t.num_train_epochs} x "
            f"{len(sampler)} batches per epoch); raise num_train_epochs or set max_steps"
        )
    return registry, data, sampler, total


def _record_tasks(out: Path, registry: TaskRegistry, data: dict) -> None:
    resolved = {
        task: {
            "rows": len(data[task]),
            "weight": registry.weight(task),
            "instruction": registry.instruction(task),
        }
        for task in data
    }
    (out / "tasks_resolved.json").write_text(json.dumps(resolved, indent=2))
    log.info("tasks: %s", {k: (v["rows"], v["weight"]) for k, v in resolved.items()})


def setup(cfg: TrainSettings, info: DistInfo, folder: RunFolder) -> Setup:
    registry, data, sampler, total = _data(cfg, info)
    monitor = Monitor(cfg, folder.path)  # reads (and checks) the eval folders before training
    if info.is_main:
        with writing(folder.path, "--output"):
            _record_tasks(folder.path, registry, data)
        log.info("%d steps (%d per epoch), global batch %d", total, len(sampler),
                 sampler.global_batch_size)  # fmt: skip
    model = build_model(cfg, info)
    t = cfg.train
    bf16 = use_mixed_bf16(t.mixed_precision, info.device)
    if info.is_main:
        computes = "bf16" if bf16 else "float32"
        log.info("device %s; this run computes in %s", describe(info.device), computes)
    packed = t.packed if t.packed is not None else model.packed_training_default()
    if packed and not model.packing_supported():
        raise ConfigError(
            f"--packed true needs a decoder with plain causal attention; "
            f"{type(model.base_model).__name__} is not one (use --packed false)"
        )
    if info.is_main:
        log.info("training forwards: %s", "packed (no padding)" if packed else "padded")
    if t.fsdp is False and info.world_size > 1:
        raise ConfigError(
            "--fsdp false with several processes: gradients would not be synchronised; "
            "multi-process training shards with FSDP2 (leave --fsdp unset)"
        )
    sharded = t.fsdp if t.fsdp is not None else info.world_size > 1
    if cfg.loss.embed_distil_vector_weight > 0 and sharded:
        raise ConfigError(
            "--embed_distil_vector_weight needs a single process without FSDP: the learned "
            "projection runs outside the sharded model's forward (use --embed_distil_weight, "
            "which needs no projection, for multi-process runs)"
        )
    teacher = _teacher(cfg, info, registry, data, sampler, total)
    if cfg.loss.embed_distil_vector_weight > 0:
        add_distil_projection(model, teacher.dim, cfg.train.seed)
    if sharded:
        shard_model(model, info.device, bf16=bf16)
        if info.is_main:
            log.info("FSDP2: every decoder layer sharded over %d process(es)", info.world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model, t.learning_rate, cfg.loss.embed_distil_projection_lr),
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        fused=info.device.type == "cuda",  # one kernel for all parameters on GPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, total, t.lr_scheduler)
    )
    return Setup(cfg=cfg, info=info, folder=folder, registry=registry, data=data,
                 sampler=sampler, total_steps=total, model=model, params=params,
                 optimizer=optimizer, scheduler=scheduler, bf16=bf16, packed=packed,
                 monitor=monitor, teacher=teacher)  # fmt: skip


def param_groups(model: Embedder, lr: float, projection_lr: float | None) -> list[dict]:
    """The optimizer's parameter groups: every trainable weight at ``lr``, and vector
    distillation's map (where there is one) in a group of its own at ``projection_lr`` (none:
    ``lr``), in that order."""
    projection = getattr(model, "distil_projection", None)
    mapped = {id(p) for p in projection.parameters()} if projection is not None else set()
    trained = [p for p in model.parameters() if p.requires_grad and id(p) not in mapped]
    groups = [{"params": trained, "lr": lr}]
    if projection is not None:
        groups.append({"params": list(projection.parameters()), "lr": projection_lr or lr})
    return groups


def _teacher(cfg: TrainSettings, info: DistInfo, registry, data: dict, sampler: EpochSampler,
             total: int) -> TeacherVectors | None:  # fmt: skip
    """The teacher's vectors of the texts the run's ``total`` steps train on, where a loss term
    or the topic batches (which it also sets up here) read them; None otherwise."""
    if not (cfg.loss.needs_teacher_vectors or cfg.data.topic_rows > 0):
        return None
    from conretriever.evaluation.evaluate import default_cache_dir

    if cfg.data.topic_rows > 0:  # the topics, and so the plan, need every document's vector
        texts = TeacherTexts.of_rows(data, registry)
    else:  # the plan is fixed by the seed: only the texts its batches will hold
        texts = TeacherTexts.of_items(planned_items(cfg, data, registry, sampler, total))
        if info.is_main:
            log.info("teacher: the %d steps draw %d distinct queries and %d documents (the "
                     "data has %d rows)", total, sum(map(len, texts.queries.values())),
                     len(texts.docs), sum(map(len, data.values())))  # fmt: skip
    teacher = TeacherVectors.build(cfg.loss.embed_distil_model, texts, info.device,
                                   cache_dir=default_cache_dir(),
                                   doc_max_length=cfg.loss.embed_distil_doc_max_length)  # fmt: skip
    if cfg.data.topic_rows > 0:
        sampler.topics = _topics(data, teacher, cfg.data.topic_rows, cfg.train.seed)
    # built for the topics only: no distillation term reads it
    return teacher if cfg.loss.needs_teacher_vectors else None


def planned_items(cfg: TrainSettings, data: dict, registry, sampler: EpochSampler,
                  total: int) -> Iterator:  # fmt: skip
    """Every training item of global batches ``0..total``, as the ranks will build them (a
    rank's slice of a batch is the same slots, drawn with the same per-slot seeds)."""
    plan_epoch, plan = -1, []
    for step in range(total):
        epoch, index = divmod(step, len(sampler))
        if epoch != plan_epoch:
            plan_epoch, plan = epoch, sampler.batches(epoch)
        yield from build_items(plan[index], data, registry, cfg.data.n_hard_negative,
                               cfg.train.seed, epoch, index)  # fmt: skip


def add_distil_projection(model: Embedder, teacher_dim: int, seed: int) -> None:
    """Give ``model`` vector distillation's learned map ``distil_projection`` (its dimension ->
    the teacher's, no bias; see ``training.loss``), in the backbone's parameter dtype and on its
    device. A submodule, so the optimizer, gradient clipping and checkpoints hold it like an
    adapter; the export writes the backbone alone, so no saved model carries it. Not for a
    sharded model (``setup`` refuses that first)."""
    weight = next(p for p in model.backbone.parameters() if p.is_floating_point())
    generator = torch.Generator().manual_seed(seed + 1)  # the same map on every rerun
    projection = torch.nn.Linear(model.dim, teacher_dim, bias=False)
    bound = math.sqrt(3 / model.dim)  # entries of variance 1 / dim: |W s| of order 1
    with torch.no_grad():
        projection.weight.uniform_(-bound, bound, generator=generator)
    model.distil_projection = projection.to(device=weight.device, dtype=weight.dtype)


def _topics(data: dict, teacher: TeacherVectors, topic_rows: int, seed: int) -> dict:
    """{task: TaskTopics} of every task (``data.topics``), from the teacher's vectors of each
    row's first positive. Rank 0 computes them and the others receive its result: the batch
    plan must be the same everywhere, and k-means' matrix products may round differently on
    another node's CPU."""
    out = {}
    if runtime.is_main():
        for task, rows in data.items():
            out[task] = topics.task_topics([ex.positives[0] for ex in rows], teacher.documents,
                                           topic_rows, seed)  # fmt: skip
            log.info(topics.describe(task, out[task]))
    if runtime.is_distributed():
        shared = [out]
        torch.distributed.broadcast_object_list(shared, src=0)
        out = shared[0]
    return out


def resume(s: Setup) -> int:
    """The step to start from: 0, or the newest loadable checkpoint's of this run. The
    schedule and weight decay are then those of the (possibly ``force``-changed) config."""
    if not s.folder.resumed:
        return 0
    damaged: tuple[Path, ...] = ()
    while True:
        found = checkpoint.latest_loadable(s.folder.path, s.folder.run_id, skip=damaged)
        if found is None:
            if s.info.is_main:
                log.info("--resume: no checkpoint of this run in %s, starting from scratch",
                         s.folder.path)  # fmt: skip
            return 0
        try:
            # A failed load may have written part of the weights; the next one overwrites
            # every trainable weight and optimizer entry again, so nothing of it survives.
            start = checkpoint.load(found, s.model, s.optimizer, s.scheduler)
            break
        except checkpoint.Unreadable as err:
            if s.info.is_main:
                log.warning("%s; trying the previous one", err)
            damaged += (found,)
    s.monitor.restore(found)
    t = s.cfg.train
    # the settings' rates, not the checkpoint's: --resume force may have changed them
    groups = param_groups(s.model, t.learning_rate, s.cfg.loss.embed_distil_projection_lr)
    rates = [group["lr"] for group in groups]
    s.scheduler.base_lrs = rates
    factor = lr_factor(start, t.warmup_steps, s.total_steps, t.lr_scheduler)
    for group, rate in zip(s.optimizer.param_groups, rates, strict=True):
        group["initial_lr"] = rate
        group["lr"] = rate * factor
        group["weight_decay"] = t.weight_decay
    if s.info.is_main:
        log.info("resumed from %s at step %d (lr %.3g)", found, start, t.learning_rate * factor)
    return start


def objective(cfg: TrainSettings, batch: dict, projection: torch.nn.Module | None = None):
    """The loss of one batch, as a function of its query and document embeddings
    (``projection``: the model's ``distil_projection``, where vector distillation is on)."""
    settings = cfg.loss
    ids = batch["doc_text_ids"] if cfg.data.mask_false_negatives else None
    teacher = batch.get("teacher_scores")
    vectors = batch.get("teacher_vectors")

    def loss(q: torch.Tensor, d: torch.Tensor):
        return training_loss(q, d, settings, ids, teacher, vectors, projection)

    return loss


def one_step(s: Setup, step: int, plan: list) -> StepResult:
    """Build this rank's slice of global batch ``step`` and take one optimisation step."""
    t, info = s.cfg.train, s.info
    epoch, batch_index = divmod(step, len(s.sampler))
    b = t.per_device_train_batch_size
    local = plan[batch_index][info.rank * b : (info.rank + 1) * b]
    items = build_items(local, s.data, s.registry, s.cfg.data.n_hard_negative, t.seed, epoch,
                        batch_index, slot_offset=info.rank * b)  # fmt: skip
    batch = collate(items, s.model, with_teacher=s.cfg.loss.distil_weight > 0)
    if s.teacher is not None:
        batch["teacher_vectors"] = s.teacher.for_items(items)
    return train_step(
        s.model,
        batch,
        objective(s.cfg, batch, getattr(s.model, "distil_projection", None)),
        s.optimizer,
        s.scheduler,
        params=s.params,
        max_grad_norm=t.max_grad_norm,
        chunk_size=t.chunk_size,
        chunk_tokens=t.chunk_tokens,
        packed=s.packed,
        device=info.device,
        autocast=s.autocast,
    )


def _row(s: Setup, step: int, r: StepResult) -> dict:
    return {
        "step": step + 1,
        "epoch": round(step / len(s.sampler), 4),
        "loss": round(r.loss, 6) if math.isfinite(r.loss) else r.loss,
        "accuracy": round(r.accuracy, 4),
        "lr": r.lr,
        "grad_norm": round(r.grad_norm, 6) if math.isfinite(r.grad_norm) else r.grad_norm,
        "tokens_per_s": round(r.tokens * s.info.world_size / r.seconds, 1),
        "step_s": round(r.seconds, 3),
        "peak_mem_mb": round(peak_memory_mb(s.info.device), 1),
        **r.stats,
        **({} if r.finite else {"skipped": True}),
    }


def run_steps(s: Setup, start: int) -> dict:
    """Steps ``start..total``: metrics, progress, checkpoints, evaluation, the non-finite rule."""
    t = s.cfg.train
    runlog = RunLog(s.folder.path, s.info.is_main, t.report_to == "tensorboard", start)
    bar = Progress(s.total_steps, "train", enabled=s.info.is_main, initial=start, unit="steps")
    plan_epoch, plan, last, bad = -1, [], {}, 0
    try:
        for step in range(start, s.total_steps):
            epoch = step // len(s.sampler)
            if epoch != plan_epoch:
                plan_epoch, plan = epoch, s.sampler.batches(epoch)
            result = one_step(s, step, plan)
            last = _row(s, step, result)
            if (step + 1) % t.logging_steps == 0 or step + 1 == s.total_steps or not result.finite:
                runlog.log(last)
            if not result.finite:
                bad += 1
                _bad_step(s, step, result, bad)
            postfix = {"loss": f"{result.loss:.4f}", "acc": f"{result.accuracy:.2f}"}
            if s.monitor.due(step + 1, s.total_steps):  # before the save: it keeps the record
                postfix.update(_evaluate(s, step + 1, runlog))
            if t.save_steps and (step + 1) % t.save_steps == 0 and step + 1 < s.total_steps:
                _save(s, step + 1)
            if t.export_steps and (step + 1) % t.export_steps == 0 and step + 1 < s.total_steps:
                export(s, f"export-{step + 1}")
            bar.set_postfix(**postfix)
            bar.update(1)
    finally:
        bar.close()
        runlog.close()
    return last


def _save(s: Setup, step: int, name: str | None = None) -> None:
    t = s.cfg.train
    best = {"best": s.monitor.best} if s.monitor.best else {}
    checkpoint.save(s.folder.path, step, s.model, s.optimizer, s.scheduler, s.folder.run_id,
                    t.save_total_limit, name=name, extra=best)  # fmt: skip


def _evaluate(s: Setup, step: int, runlog: RunLog) -> dict:
    """Evaluate during training; keep a new best. Returns the progress line's additions."""
    row = s.monitor.evaluate(s.model, step)
    runlog.log(row)
    score = s.monitor.score(row)
    if s.monitor.improved(row) and s.cfg.evaluation.keep_best:
        _save(s, step, name=BEST_NAME)
    if s.info.is_main:
        shown = {k.split("/")[1]: round(v * 100, 2) for k, v in row.items()
                 if k.endswith(s.cfg.evaluation.metric_for_best_model.split("/")[-1])}  # fmt: skip
        log.info("step %d: eval %s (best %.4f at step %d)", step, shown, s.monitor.best["score"],
                 s.monitor.best["step"])  # fmt: skip
    metric = s.cfg.evaluation.metric_for_best_model.split("/")[-1]
    return {f"eval_{metric}": f"{100 * score:.2f}"}


def _bad_step(s: Setup, step: int, r: StepResult, bad: int) -> None:
    what = f"loss {r.loss}, gradient norm {r.grad_norm}"
    allowed = s.cfg.train.max_bad_steps
    if bad > allowed:
        kept = [p.name for p in checkpoint.checkpoints(s.folder.path)]
        raise TrainingError(
            f"step {step + 1}: {what} is not finite; the run stops with nothing written for it "
            f"(kept: {', '.join(kept) or 'no checkpoint'}; no final/ exported). Lower the "
            f"learning rate, or allow skipped steps with --max_bad_steps (now {allowed})"
        )
    if s.info.is_main:
        log.warning("step %d: %s is not finite: step skipped (%d of %d allowed)",
                    step + 1, what, bad, allowed)  # fmt: skip


def _load_best(s: Setup) -> None:
    """``export: best``: the best evaluated weights replace the last ones before export."""
    best = s.folder.path / BEST_NAME
    if s.monitor.best is None or not best.exists():
        log.warning("export best: no evaluation was kept (eval_data/eval_steps/keep_best); "
                    "exporting the last weights")  # fmt: skip
        return
    checkpoint.load(best, s.model, s.optimizer, s.scheduler)
    if s.info.is_main:
        log.info("export best: step %d (%s %.4f)", s.monitor.best["step"],
                 s.monitor.best["metric"], s.monitor.best["score"])  # fmt: skip


def export(s: Setup, name: str) -> Path | None:
    """Merge LoRA and write the model folder ``<output>/<name>`` (rank 0); gathers the full
    weights first under FSDP. Returns the folder on rank 0."""
    state = None
    if s.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            s.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        state = {k.removeprefix("backbone."): v for k, v in full.items()}
    path = None
    if runtime.is_main():
        weights = state.values() if state is not None else s.model.state_dict().values()
        if not all(torch.isfinite(w).all() for w in weights if w.is_floating_point()):
            raise TrainingError(f"the trained weights hold NaN or infinity; {name}/ not written")
        path = s.model.save(s.folder.path / name, state_dict=state, settings=saved_settings(s))
        write_card(path, s.folder.path)
    runtime.barrier()
    return path


def saved_settings(s: Setup) -> EmbedderSettings:
    """The settings a saved folder records: the model's, reading ``saved_doc_max_length``
    document tokens when that is set (training may read fewer, for speed)."""
    length = s.cfg.model.saved_doc_max_length
    if not length:
        return s.model.settings
    return replace(s.model.settings, doc_max_length=length)


def export_final(s: Setup) -> Path | None:
    """``final/``: the last weights, or with ``export: best`` the best evaluated ones."""
    if s.cfg.evaluation.export == "best":
        _load_best(s)
    return export(s, "final")


def train(cfg: TrainSettings) -> dict:
    """Run training as ``cfg`` says; returns ``{"final": path, "last": last metrics row}``."""
    runtime.bound_kernel_cache()  # before the teacher's or the model's first matrix product
    info = runtime.init_distributed(group_of_one=bool(cfg.train.fsdp))
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    folder = prepare(cfg)
    finished = False
    try:
        try:
            s = setup(cfg, info, folder)
        except BaseException:  # nothing trained: the folder is free for the corrected command
            folder.release_unstarted()
            raise
        start = resume(s)
        # Metrics, checkpoints and exports: a full disk mid-run is one line naming the run
        # folder (checkpoints and final/ are written aside and renamed, so the last complete
        # checkpoint stays resumable).
        with writing(folder.path, "--output"):
            last = run_steps(s, start)
            final = export_final(s)
        if info.is_main:
            log.info("final model: %s (last step: %s)", final, last)
        finished = True
        return {"final": str(final) if final else None, "last": last}
    finally:
        folder.close()
        runtime.cleanup(synchronize=finished)


def main(cfg: TrainSettings) -> int:
    """``conretriever train``."""
    train(cfg)
    return 0
