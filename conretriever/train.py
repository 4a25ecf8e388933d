"""The training loop: ``python -m conretriever train`` (one process) or under ``torchrun``.

One step = one GLOBAL batch from the epoch plan (``data.EpochSampler``): this rank's slice is
formatted and tokenized, GradCache (``grad_cache.grad_cache_step``) accumulates the exact
full-batch gradient of the contrastive loss (``loss.contrastive_loss``), then the gradient is
clipped and AdamW steps. The run's position is just the step number: the plan for every epoch is
a pure function of (seed, epoch), so ``step -> (epoch, batch)`` is all a resume needs besides the
model, optimizer and RNG states.

Checkpoints (``save_steps``) are sharded with ``torch.distributed.checkpoint`` (each rank writes
its own shard; with LoRA only the trainable weights are stored), written to a ``.tmp`` folder and
renamed when complete, and rotated (``save_total_limit``). ``--resume true`` continues from the
newest complete one and reproduces the uninterrupted run (same losses, same weights). The final
model is exported with ``Embedder.save`` (LoRA merged; loads in sentence-transformers).
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from conretriever import distributed as dist_utils
from conretriever.config import ConfigError, RunConfig, parse_config
from conretriever.data import EpochSampler, build_items, collate, load_training_data
from conretriever.grad_cache import grad_cache_step
from conretriever.loss import contrastive_loss
from conretriever.modeling import Embedder, LoraSettings
from conretriever.precision import describe, use_mixed_bf16
from conretriever.progress import Progress
from conretriever.tasks import TaskRegistry

log = logging.getLogger("conretriever.train")


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def _param_dtype(cfg: RunConfig, info: dist_utils.DistInfo) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    # On a CPU the weights stay fp32 (autocast computes in bf16 where that is native, see
    # conretriever.precision); bf16 weights would also make the optimizer update in bf16.
    # FSDP keeps fp32 shards and computes in bf16 via its policy; one GPU with LoRA can hold the
    # frozen base in bf16 (autocast computes in bf16 anyway); full fine-tuning needs fp32 masters.
    if info.device.type == "cuda" and info.world_size == 1 and cfg.model.use_lora:
        return "bfloat16"
    return "float32"


def _use_bf16(cfg: RunConfig, info: dist_utils.DistInfo) -> bool:
    return use_mixed_bf16(cfg.train.mixed_precision, info.device)


def build_model(cfg: RunConfig, info: dist_utils.DistInfo) -> Embedder:
    m = cfg.model
    torch.manual_seed(cfg.train.seed)  # LoRA init must be identical on every rank and rerun
    lora = LoraSettings(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    model = Embedder.from_pretrained(
        m.model_name_or_path,
        pooling=m.pooling,
        normalize=m.normalize,
        lora=lora if m.use_lora else None,
        dtype=_param_dtype(cfg, info),
        device=info.device,
        prompt_format=m.prompt_format,
        query_max_length=m.query_max_length,
        doc_max_length=m.doc_max_length,
        attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    model.train()
    return model


# --- checkpoints ---------------------------------------------------------------------------------


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def _state_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights never change: storing them in every checkpoint would cost 14 GB per
    # checkpoint for a 7B model with LoRA, for nothing. Loading is then non-strict (the frozen
    # weights come from the model spec); load_checkpoint checks every trainable weight is there.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, cfg: RunConfig) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist_utils.rank()
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_utils.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    rng = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "world_size": dist_utils.world_size(),
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
    dist_utils.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # complete or absent: a resume never sees a partial checkpoint
        for old in _checkpoints(out)[: -cfg.train.save_total_limit or None]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = json.loads((path / "trainer_state.json").read_text())
    world = dist_utils.world_size()
    if state["world_size"] != world:
        raise RuntimeError(
            f"{path}: saved with {state['world_size']} processes, resuming with {world}: "
            "exact resume needs the same world size"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path / "state"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if missing := trainable - set(sd["model"]):
        raise RuntimeError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]}")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=sd["model"],
        optim_state_dict=sd["optim"],
        options=_state_options(strict=False),
    )
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / f"rng_rank{dist_utils.rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


# --- metrics -------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl (+ TensorBoard) on rank 0. On resume, rows past the checkpoint are dropped
    so the file reads like one uninterrupted run."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            keep = [r for r in rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- the loop ------------------------------------------------------------------------------------


def export_final(model: Embedder, out: Path, sharded: bool) -> Path | None:
    """Merge LoRA and write ``out/final`` (rank 0); gathers the full weights first under FSDP."""
    state = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        state = {k.removeprefix("backbone."): v for k, v in full.items()}
    path = None
    if dist_utils.rank() == 0:
        path = model.save(out / "final", state_dict=state)
    dist_utils.barrier()
    return path


def train(cfg: RunConfig) -> dict:
    info = dist_utils.init_distributed()
    out = Path(cfg.train.output_dir)
    t = cfg.train
    registry = TaskRegistry.load(cfg.data.task_config)
    data = load_training_data(cfg.data.train_data, registry)
    global_batch = t.per_device_train_batch_size * info.world_size
    sampler = EpochSampler(
        {task: len(rows) for task, rows in data.items()},
        {task: registry.weight(task) for task in data},
        global_batch,
        seed=t.seed,
        batch_same_task=cfg.data.batch_same_task,
    )
    steps_per_epoch = len(sampler)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * len(sampler))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
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
        log.info(
            "%d steps (%d per epoch), global batch %d", total_steps, steps_per_epoch, global_batch
        )

    model = build_model(cfg, info)
    bf16 = _use_bf16(cfg, info)
    if info.is_main:
        log.info(
            "device %s; this run computes in %s",
            describe(info.device),
            "bf16" if bf16 else "float32",
        )
    sharded = info.world_size > 1
    if sharded:
        dist_utils.shard_model(model, info.device, bf16=bf16)

    def autocast():
        if bf16 and not sharded:  # FSDP's policy already computes in bf16
            return torch.autocast(info.device.type, dtype=torch.bfloat16)
        return nullcontext()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        fused=info.device.type == "cuda",  # one kernel for all parameters on GPU
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, total_steps, t.lr_scheduler)
    )
    start = 0
    if t.resume:
        found = _checkpoints(out) if out.exists() else []
        if found:
            start = load_checkpoint(found[-1], model, optimizer, scheduler)
            if info.is_main:
                log.info("resumed from %s at step %d", found[-1], start)
        elif info.is_main:
            log.info("--resume: no checkpoint in %s, starting from scratch", out)
    metrics = Metrics(out, info.is_main, t.report_to == "tensorboard", start)

    packed = t.packed if t.packed is not None else model.packed_training_default()
    if packed and not model.packing_supported():
        raise ConfigError(
            f"packed: true needs a decoder with plain causal attention; "
            f"{type(model.base_model).__name__} is not one (set packed: false)"
        )
    if info.is_main:
        log.info("training forwards: %s", "packed (no padding)" if packed else "padded")

    def loss_fn(q, d, ids):
        return contrastive_loss(
            q,
            d,
            t.temperature,
            ids if cfg.data.mask_false_negatives else None,
            cross_device=t.cross_device_negatives,
        )

    bar = Progress(total_steps, "train", enabled=info.is_main, initial=start, unit="steps")
    plan_epoch, plan = -1, []
    b = t.per_device_train_batch_size
    last = {}
    for step in range(start, total_steps):
        epoch, batch_index = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:
            plan_epoch, plan = epoch, sampler.batches(epoch)
        local = plan[batch_index][info.rank * b : (info.rank + 1) * b]
        items = build_items(
            local,
            data,
            registry,
            cfg.data.n_hard_negative,
            t.seed,
            epoch,
            batch_index,
            slot_offset=info.rank * b,
            prompt_format=cfg.model.prompt_format,
        )
        batch = collate(items, model.tokenize, cfg.model.query_max_length, cfg.model.doc_max_length)
        tic = time.perf_counter()
        ids = batch["doc_text_ids"]
        result = grad_cache_step(
            model,
            batch["query"],
            batch["doc"],
            lambda q, d, ids=ids: loss_fn(q, d, ids),
            t.chunk_size,
            info.device,
            autocast,
            chunk_tokens=t.chunk_tokens,
            packed=packed,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - tic
        tokens = int(batch["query"]["attention_mask"].sum() + batch["doc"]["attention_mask"].sum())
        last = {
            "step": step + 1,
            "epoch": round(step / steps_per_epoch, 4),
            "loss": round(float(result.loss), 6),
            "accuracy": round(result.accuracy, 4),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": round(
                float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                6,
            ),
            "tokens_per_s": round(tokens * info.world_size / seconds, 1),
            "step_s": round(seconds, 3),
            "peak_mem_mb": round(_peak_memory_mb(info.device), 1),
        }
        if (step + 1) % t.logging_steps == 0 or step + 1 == total_steps:
            metrics.log(last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
        bar.update(1)
        if t.save_steps and (step + 1) % t.save_steps == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, model, optimizer, scheduler, cfg)
    bar.close()
    metrics.close()
    final = export_final(model, out, sharded)
    if info.is_main:
        log.info("final model: %s (last step: %s)", final, last)
    dist_utils.cleanup()
    return {"final": str(final) if final else None, "last": last}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(argv, description="Contrastive training of an LLM retriever.")
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    train(cfg)
    return 0
