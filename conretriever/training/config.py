"""Every knob of a training run, as typed dataclasses: parsed once, validated, saved with the run.

A run has these sections: ``model`` (what to load and how: ``model.embedder`` is the
:class:`~conretriever.model.settings.EmbedderSettings` and ``model.lora`` the
:class:`~conretriever.model.settings.LoraSettings`, the same classes the model itself uses),
``data``, ``train``, ``loss`` (the objective: :class:`~conretriever.training.loss.LossSettings`,
the class the loss itself takes) and ``evaluation``. Values come from, in increasing priority:
the defaults below, a YAML file (``--config FILE``; sections nested, or flat names anywhere) and
flags. Flags are flat, named like
the fields (``--learning_rate 1e-4``, ``--use_lora false``, ``--query_max_length 64``; LoRA's
carry a ``lora_`` prefix: ``--lora_r 8``), which keeps the seed project's flag names working;
the dashed spelling works too. Every value is checked when it is read (``conretriever.options``).

The resolved config is written to ``<output>/config.yaml``; :func:`trajectory` is the part
of it that decides the training trajectory, which ``--resume`` compares before continuing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from conretriever.errors import ConfigError
from conretriever.model.settings import EmbedderSettings, LoraSettings
from conretriever.options import opt, output_opt, parse, to_dict
from conretriever.saved_config import upgrade_saved
from conretriever.training.loss import LossSettings

DESCRIPTION = "Contrastive training of an LLM retriever (python, or torchrun for many processes)."


@dataclass
class TrainModelSettings:
    model_name_or_path: str = opt(
        "embedded:gemma-3-270m",
        help="HF id, local dir, .gguf file, embedded:gemma-3-270m or embedded:minilm",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", help="weights; auto: bf16 on one GPU with LoRA, else fp32 (autocast does the rest)"
    )
    attn_implementation: str | None = opt(
        None,
        choices=("sdpa", "eager", "flash_attention_2", "flex_attention"),
        help="none: transformers' choice for the architecture (SDPA where supported)",
    )
    use_lora: bool = opt(True, help="train a LoRA adapter (false: full fine-tuning)")
    freeze_embeddings: bool = opt(
        False,
        help="full fine-tuning: keep the token embedding matrix fixed (Gemma-3-270M: 168M of "
        "its 268M weights, whose dense gradient and AdamW update are most of what a full step "
        "costs over a LoRA one)",
    )
    gradient_checkpointing: bool = opt(
        False, help="recompute activations in backward: less memory, ~30% more compute"
    )
    keep_layers: int = opt(
        0,
        ge=0,
        help="0: every layer; N: only the model's first N transformer layers (the rest are cut "
        "before training: each step and each encoding costs about N/layers, and the saved "
        "model is the smaller one)",
    )
    saved_doc_max_length: int = opt(
        0,
        ge=0,
        help="document tokens the saved model folders (final/, export-N/) read when they "
        "encode; 0: doc_max_length, what training read. Training on short documents is cheaper, "
        "and a model trained at 128 read SciFact's ~300-token abstracts better at 256",
    )
    embedder: EmbedderSettings = opt(default_factory=EmbedderSettings)
    lora: LoraSettings = opt(default_factory=LoraSettings, prefix="lora_")

    def validate(self) -> None:
        if self.use_lora and self.freeze_embeddings:
            raise ConfigError(
                "--freeze_embeddings applies to full fine-tuning (--use_lora false); a LoRA "
                "adapter leaves the embeddings fixed already"
            )
        if not self.use_lora and self.lora.top_layers:
            raise ConfigError(
                f"--lora_top_layers {self.lora.top_layers}: applies to a LoRA adapter, and "
                "--use_lora is false (full fine-tuning trains every layer)"
            )


@dataclass
class TrainDataSettings:
    train_data: str = opt(
        "training_data/demo", help="a folder of <task>.jsonl[.gz] files, or one such file"
    )
    task_config: str | None = opt(
        None, help="YAML adding or overriding task registry entries (weight, query/passage type)"
    )
    n_hard_negative: int = opt(1, ge=0, help="hard negatives per query, drawn afresh each epoch")
    batch_same_task: bool = opt(
        True, help="every global batch from one task: in-batch negatives stay on-distribution"
    )
    mask_false_negatives: bool = opt(
        True, help="drop in-batch documents whose text equals the query's positive"
    )
    topic_rows: int = opt(
        0,
        ge=0,
        help="batches from topics of ~N rows (k-means of the teacher's document vectors, "
        "--embed_distil_model) so in-batch negatives share a subject; 0: off",
    )
    allow_extra_fields: bool = opt(
        False, help="accept training rows with keys beyond the known ones (ignored, counted)"
    )


@dataclass
class TrainLoopSettings:
    output: str = output_opt(
        "outputs/demo", help="run folder: config, checkpoints, metrics, final/"
    )
    overwrite_output_dir: bool = opt(
        False,
        help="start afresh in an --output folder that holds another run (removes its outputs)",
    )
    resume: Literal["false", "true", "force"] = opt(
        "false",
        help="continue from the newest complete checkpoint; force: even if trajectory settings "
        "changed (the new values apply)",
    )
    per_device_train_batch_size: int = opt(8, ge=1, help="queries per process per step")
    chunk_size: int = opt(
        4, ge=0, help="GradCache rows per forward; 0 (and chunk_tokens 0): no cache"
    )
    chunk_tokens: int = opt(
        0, ge=0, help="GradCache chunks of <= this many tokens, rows length-sorted"
    )
    packed: bool | None = opt(
        None, help="padding-free forwards; none: on for decoders where it pays (CPU, varlen GPU)"
    )
    fsdp: bool | None = opt(
        None, help="shard with FSDP2; none: when there is more than one process (true: also one)"
    )
    learning_rate: float = opt(1e-4, gt=0, help="peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, ge=0)
    num_train_epochs: float = opt(1.0, gt=0, help="epochs (fractions allowed)")
    max_steps: int = opt(-1, ge=-1, help="> 0 overrides num_train_epochs; -1: from the epochs")
    warmup_steps: int = opt(0, ge=0, help="linear warmup steps")
    lr_scheduler: Literal["linear", "cosine", "constant"] = opt("linear", help="decay after warmup")
    max_grad_norm: float = opt(1.0, gt=0, help="gradient clipping (L2 norm)")
    seed: int = opt(42)
    mixed_precision: Literal["auto", "bf16", "no"] = opt(
        "auto", help="auto: bf16 where the GPU/CPU computes it natively, else fp32"
    )
    logging_steps: int = opt(1, ge=1, help="metrics row every N steps")
    save_steps: int = opt(0, ge=0, help="sharded checkpoint every N steps (0: none)")
    save_total_limit: int = opt(2, ge=-1, help="checkpoints kept (-1: all)")
    export_steps: int = opt(
        0,
        ge=0,
        help="also export a model folder export-<step>/ every N steps, to average "
        "(conretriever average); 0: final/ only",
    )
    max_bad_steps: int = opt(
        0, ge=0, help="non-finite loss/gradient steps skipped before the run stops"
    )
    report_to: Literal["tensorboard", "none"] = opt(
        "tensorboard", help="metrics also to TensorBoard (metrics.jsonl always)"
    )

    def validate(self) -> None:
        if self.save_total_limit == 0:
            raise ConfigError(
                "--save_total_limit: must be >= 1, or -1 to keep every checkpoint, got 0"
            )
        if self.max_steps == 0:
            raise ConfigError("--max_steps: 0 would train nothing; use -1 (epochs) or >= 1")


@dataclass
class TrainEvalSettings:
    """Evaluation during training (``training.monitor``); none of it changes the trajectory."""

    eval_data: list[str] = opt(
        default_factory=list, commas="path", help="local BEIR folders evaluated during training"
    )
    eval_steps: int = opt(0, ge=0, help="evaluate every N steps and after the last (0: never)")
    eval_max_queries: int | None = opt(None, ge=1, help="a fixed subset: the first N queries")
    eval_max_docs: int | None = opt(
        None, ge=1, help="a fixed subset: their relevant documents plus a seeded sample, N in all"
    )
    eval_batch_size: int = opt(256, ge=1, help="most texts per forward while evaluating")
    metric_for_best_model: str = opt(
        "ndcg_at_10", help="average over eval_data, or eval/<task>/<metric> for one folder"
    )
    keep_best: bool = opt(True, help="save each new best as checkpoint-best/ (never rotated)")
    export: Literal["last", "best"] = opt(
        "last", help="final/ holds the last weights, or the best evaluated ones"
    )


@dataclass
class TrainSettings:
    model: TrainModelSettings = field(default_factory=TrainModelSettings)
    data: TrainDataSettings = field(default_factory=TrainDataSettings)
    train: TrainLoopSettings = field(default_factory=TrainLoopSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    evaluation: TrainEvalSettings = field(default_factory=TrainEvalSettings)

    def validate(self) -> None:
        if self.data.topic_rows and not self.loss.embed_distil_model:
            raise ConfigError(
                "--topic_rows groups rows by a teacher's document vectors: it needs "
                "--embed_distil_model (e.g. embedded:minilm; --embed_distil_weight may be 0)"
            )
        if self.data.topic_rows and not self.data.batch_same_task:
            raise ConfigError(
                "--topic_rows orders each task's rows by topic: it needs --batch_same_task true"
            )

    def to_dict(self) -> dict:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        """Write-then-rename: a resume on a full disk keeps the saved config it compared with."""
        from conretriever.files import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# Settings that do not change what the run computes: where it writes, how often it reports
# or saves, how it was started, and the whole evaluation section (evaluating restores every
# RNG). Every other field is part of the trajectory.
NOT_TRAJECTORY = {
    ("train", "output"),
    ("train", "overwrite_output_dir"),
    ("train", "resume"),
    ("train", "logging_steps"),
    ("train", "save_steps"),
    ("train", "save_total_limit"),
    ("train", "export_steps"),
    ("train", "report_to"),
    ("train", "max_bad_steps"),
}


def trajectory(config: dict) -> dict[str, object]:
    """``section.field`` -> value of every trajectory setting in a config dict (nested; an
    earlier version's layout is upgraded first)."""
    out: dict[str, object] = {}
    config = upgrade_saved(config)

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            here = (*path, key)
            if isinstance(value, dict):
                walk(value, here)
            elif here[:2] not in NOT_TRAJECTORY and here[0] != "evaluation":
                out[".".join(here)] = value

    walk(config, ())
    return out


def parse_config(argv: list[str] | None) -> TrainSettings:
    """Defaults <- ``--config`` YAML <- flags; raises ConfigError naming the flag or key."""
    return parse(TrainSettings, argv, prog="conretriever train", description=DESCRIPTION)
