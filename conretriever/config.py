"""Every knob of a run, as typed dataclasses: parsed once, validated, saved with the run.

A run is described by three sections (``model``, ``data``, ``train``; evaluation is a separate
command, ``conretriever eval``, which the training script runs after training). Values come from,
in increasing priority: the dataclass defaults below, a YAML file (``--config FILE``, nested by
section), and command-line flags. Flags are flat and named like the fields (``--learning_rate
1e-4``, ``--use_lora false``), which keeps the seed project's flag names working; every field name
is unique across sections so a flat flag is never ambiguous. The resolved config is written to
``<output_dir>/config.yaml`` so a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelArgs:
    model_name_or_path: str = "embedded:gemma-3-270m"
    """HF id, local dir, ``.gguf`` file, ``embedded:gemma-3-270m`` or ``embedded:minilm``."""
    pooling: str | None = None
    """``last`` (decoders), ``mean`` or ``cls``; None = saved model's, else by architecture."""
    normalize: bool = True
    dtype: str = "auto"
    """``auto`` = bfloat16 on GPU, float32 on CPU; or ``float32`` / ``bfloat16`` / ``float16``."""
    attn_implementation: str | None = None
    """None = transformers' default for the architecture (SDPA where supported, else eager);
    or ``sdpa`` / ``eager`` / ``flash_attention_2`` / ``flex_attention``."""
    prompt_format: str = "e5"
    """``e5``: ``Instruct: {instruction}\\nQuery: {query}``; ``plain``: ``{instruction}\\n{query}``
    (the seed's); ``prefix``: ``query: ...`` / ``passage: ...``; ``none``: texts as given."""
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32  # alpha / r = 2 is the e5-mistral / peft-examples setting
    lora_dropout: float = 0.1
    lora_target_modules: str = "all-linear"
    """``all-linear`` or comma-separated module names (``q_proj,k_proj,v_proj,o_proj``)."""
    query_max_length: int = 128  # tokens, including the instruction and the appended EOS
    doc_max_length: int = 256  # tokens, including the appended EOS
    gradient_checkpointing: bool = False


@dataclass
class DataArgs:
    train_data: str = "training_data/demo"
    """A folder of ``<task>.jsonl[.gz]`` files, or one such file."""
    task_config: str | None = None
    """Optional YAML adding or overriding task registry entries (weight, query/passage type)."""
    n_hard_negative: int = 1  # hard negatives per query; drawn afresh each epoch
    batch_same_task: bool = True
    """Every global batch from one task: in-batch negatives stay on-distribution (E5 recipe)."""
    mask_false_negatives: bool = True
    """Drop in-batch documents whose text equals the query's own positive from its softmax."""


@dataclass
class TrainArgs:
    output_dir: str = "outputs/demo"
    per_device_train_batch_size: int = 8
    chunk_size: int = 4
    """GradCache chunk (sequences per forward); bounds activation memory. 0 = no cache."""
    chunk_tokens: int = 0
    """GradCache chunks of <= this many tokens (padded, or real when packed), rows length-sorted;
    chunk_size caps the rows per chunk."""
    packed: bool | None = None
    """Padding-free forwards (texts concatenated, attention kept inside each text): None = on for
    decoders where it pays (a CPU, or a GPU with PyTorch's varlen attention kernel)."""
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    warmup_steps: int = 0
    lr_scheduler: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float = 1.0
    temperature: float = 0.02
    """Softmax temperature tau as a divisor: logits = cos(q, d) / tau (scale = 1 / tau = 50)."""
    cross_device_negatives: bool = True
    seed: int = 42
    mixed_precision: str = "auto"  # auto = bf16 on GPU, none on CPU; or bf16 | no
    logging_steps: int = 1
    save_steps: int = 0  # sharded checkpoint every N steps (0 = only the final export)
    save_total_limit: int = 2  # checkpoints kept; older ones are deleted
    resume: bool = False  # continue from the newest checkpoint in output_dir
    report_to: str = "tensorboard"  # tensorboard | none


@dataclass
class RunConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the file and key."""


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_index() -> dict[str, tuple[str, dataclasses.Field, object]]:
    """flat field name -> (section, field, resolved type); asserts names are unique."""
    index: dict[str, tuple[str, dataclasses.Field, object]] = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"config field {f.name!r} is defined in two sections")
            index[f.name] = (section, f, hints[f.name])
    return index


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _unwrap_optional(tp: object) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _converter(tp: object):
    base, optional = _unwrap_optional(tp)
    inner = {bool: _parse_bool, int: int, float: float, str: str}[base]
    if not optional:
        return inner
    return lambda text: None if str(text).lower() in ("none", "null", "") else inner(text)


def _coerce(value: object, tp: object, where: str) -> object:
    """Check a YAML value against a field type (YAML already typed it; we only validate)."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            value = [value]
        return [str(v) for v in value]
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and base is not str:
        try:
            return _converter(tp)(value)
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"{where}: {err}") from None
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, dict]:
    """Read a config YAML into ``{section: {field: value}}``; unknown keys are errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    index = _field_index()
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, val in raw.items():
        if key in SECTIONS and isinstance(val, dict):
            items = [(f"{key}.{k}", k, v) for k, v in val.items()]
        else:  # a flat key at top level is accepted too
            items = [(key, key, val)]
        for where, name, v in items:
            if name not in index:
                raise ConfigError(f"{path}: unknown config key {where!r}")
            section, _, tp = index[name]
            values[section][name] = _coerce(v, tp, f"{path}: {where}")
    return values


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flat ``--field`` flag per config field (defaults untouched)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (values here override its defaults)")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        for name, (sec, _f, tp) in _field_index().items():
            if sec != section:
                continue
            base, _ = _unwrap_optional(tp)
            kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
            if typing.get_origin(base) is list:
                kwargs["nargs"] = "*"
            else:
                kwargs["type"] = _converter(tp)
                kwargs["metavar"] = getattr(base, "__name__", "X").upper()
            group.add_argument(f"--{name}", **kwargs)
    return parser


def parse_config(argv: list[str] | None, description: str = "") -> RunConfig:
    """Defaults <- ``--config`` YAML <- flags. Raises ConfigError / exits on bad flags."""
    parser = build_parser(description)
    args = vars(parser.parse_args(argv))
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    if args.get("config"):
        values = load_yaml(args.pop("config"))
    args.pop("config", None)
    index = _field_index()
    for name, val in args.items():
        values[index[name][0]][name] = val
    sections = {s: cls(**values[s]) for s, cls in _section_classes().items()}
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks with messages that say which flag to change."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.pooling not in (None, "last", "mean", "cls"):
        raise ConfigError(f"pooling must be last, mean or cls, got {m.pooling!r}")
    if m.prompt_format not in ("e5", "plain", "prefix", "none"):
        raise ConfigError(f"prompt_format must be e5/plain/prefix/none, not {m.prompt_format!r}")
    if t.temperature <= 0:
        raise ConfigError("temperature must be > 0 (it divides the cosine similarities)")
    if t.per_device_train_batch_size < 1:
        raise ConfigError("per_device_train_batch_size must be >= 1")
    if t.chunk_size < 0:
        raise ConfigError("chunk_size must be >= 0 (0 disables GradCache)")
    if d.n_hard_negative < 0:
        raise ConfigError("n_hard_negative must be >= 0")
    if t.lr_scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"lr_scheduler must be linear/cosine/constant, not {t.lr_scheduler!r}")
    if t.mixed_precision not in ("auto", "bf16", "no"):
        raise ConfigError(f"mixed_precision must be auto, bf16 or no, got {t.mixed_precision!r}")
