"""The one settings parser: flags + YAML into typed, validated dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from conretriever.errors import ConfigError
from conretriever.options import build_parser, load, opt, parse, to_dict


@dataclass
class Lora:
    r: int = opt(16, ge=1, help="rank")
    dropout: float = opt(0.1, ge=0, le=1)


@dataclass
class Model:
    name: str = opt(help="model spec")
    pooling: Literal["last", "mean", "cls"] | None = opt(None)
    lora: Lora = opt(default_factory=Lora, prefix="lora_")


@dataclass
class Train:
    batch_size: int = opt(8, ge=1, help="rows per step")
    learning_rate: float = opt(1e-4, gt=0)
    use_lora: bool = opt(True)
    tasks: list[str] = opt(default_factory=list)
    out: Path = opt(Path("outputs"))
    report_to: str = opt("none", choices=("none", "tensorboard"))


@dataclass
class Run:
    model: Model = field(default_factory=lambda: Model(name="x"))
    train: Train = field(default_factory=Train)

    def validate(self):
        if self.model.lora.r > 64 and self.train.batch_size > 100:
            raise ConfigError("lora_r > 64 with batch_size > 100 does not fit")


def test_flags_both_spellings_and_nested_prefix():
    run = parse(Run, ["--name", "m", "--lora_r", "4", "--batch-size", "3", "--learning_rate",
                      "2e-4", "--no-use-lora", "--tasks", "a", "b"], prog="t")  # fmt: skip
    assert run.model.lora.r == 4 and run.train.batch_size == 3
    assert run.train.learning_rate == 2e-4 and run.train.use_lora is False
    assert run.train.tasks == ["a", "b"] and isinstance(run.train.out, Path)
    assert parse(Run, ["--name", "m", "--use_lora"], prog="t").train.use_lora is True


def test_yaml_nested_or_flat_and_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model:\n  name: m\n  lora:\n    r: 8\ntrain:\n  batch_size: 5\n  lora_dropout: 0\n"
    )
    run = parse(Run, ["--config", str(cfg), "--batch_size", "6"], prog="t")
    assert run.model.lora.r == 8 and run.model.lora.dropout == 0.0 and run.train.batch_size == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
        (["--learning_rate", "nan"], "--learning_rate: must be a finite number"),
        (["--learning_rate", "fast"], "--learning_rate: expected a number, got 'fast'"),
        (["--pooling", "max"], "--pooling: 'max' is not allowed; use one of last, mean, cls"),
        (["--report_to", "wandb"], "'wandb' is not allowed; use one of none, tensorboard"),
        (["--lora_dropout", "1.5"], "--lora_dropout: must be <= 1, got 1.5"),
        (["--use_lora", "maybe"], "--use_lora: expected true or false"),
        (["--lerning_rate", "1"], "'--lerning_rate' (did you mean '--learning_rate'?)"),
        (["--lr", "1"], "unknown option '--lr'"),  # no silent abbreviation of --lr_...
        (["--lora_r", "80", "--batch_size", "200"], "lora_r > 64 with batch_size > 100"),
    ],
)
def test_bad_values_name_the_flag_value_and_what_is_allowed(argv, message):
    with pytest.raises(ConfigError) as err:
        parse(Run, ["--name", "m", *argv], prog="t")
    assert message in str(err.value)


def test_required_and_unknown_yaml_key(tmp_path):
    @dataclass
    class Needs:
        model: str = opt(help="spec")

    with pytest.raises(ConfigError, match="--model is required"):
        parse(Needs, [], prog="t")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch_sise: 4\n")
    match = r"c.yaml: train.batch_sise: unknown key \(did you mean 'batch_size'"
    with pytest.raises(ConfigError, match=match):
        parse(Run, ["--config", str(cfg)], prog="t")


def test_help_names_the_command_and_every_option_with_its_default():
    text = build_parser(Run, prog="conretriever t").format_help()
    assert text.startswith("usage: conretriever t")
    for flag in ("--lora_r", "--batch_size", "--learning_rate", "--report_to"):
        assert flag in text
    assert "rows per step (default: 8)" in text
    assert "one of: none, tensorboard" in text


def test_load_is_the_python_twin_and_to_dict_round_trips():
    run = load(Run, {"model": {"name": "m"}}, batch_size=2)
    assert run.train.batch_size == 2
    again = load(Run, to_dict(run))
    assert again == run
    with pytest.raises(ConfigError, match="unknown setting"):
        load(Run, {}, batch_sze=2)
