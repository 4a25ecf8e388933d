"""Every shipped config parses into a valid TrainSettings (unknown keys and bad values fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conretriever.training.config import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.loss.temperature > 0 and cfg.train.per_device_train_batch_size >= 1


def test_e5_recipe_matches_paper():
    cfg = parse_config(["--config", str(CONFIGS[0].parent / "e5_mistral_7b.yaml")])
    assert cfg.model.lora.r == 16 and cfg.loss.temperature == 0.02
    assert cfg.train.learning_rate == 1e-4 and cfg.train.num_train_epochs == 1.0
    assert cfg.train.per_device_train_batch_size * 8 == 2048


def names_task_config(path: Path) -> bool:
    import yaml

    return bool((yaml.safe_load(path.read_text()).get("data") or {}).get("task_config"))


TASK_CONFIGS = [p for p in CONFIGS if names_task_config(p)]


def test_some_shipped_config_names_a_task_file():
    """The check below covers something: the CPU recipe's config names its task weights."""
    assert "gemma_270m_cpu" in [p.stem for p in TASK_CONFIGS]


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=[p.stem for p in TASK_CONFIGS])
def test_shipped_config_task_file_exists_and_loads(path):
    """A shipped config's ``task_config`` (a path from the repository root) is in the
    repository and is a valid task registry file: a training run must not fail on it after
    minutes of mining."""
    import yaml

    from conretriever.data.tasks import TaskRegistry

    cfg = parse_config(["--config", str(path)])

    task_file = path.parents[1] / cfg.data.task_config
    registry = TaskRegistry.load(task_file)
    named = yaml.safe_load(task_file.read_text())
    assert named and set(named) <= set(registry.tasks), f"{task_file}: names no task"


def test_cpu_recipe_draws_biomedical_rows_next_to_squad():
    """The CPU recipe's mixture (rows 60-62 of benchmarks/recipe.py): squad at 0.4, the
    biomedical questions at 1, each with its own weight in the registry the config names."""
    from conretriever.data.tasks import TaskRegistry

    root = CONFIGS[0].parent.parent
    cfg = parse_config(["--config", str(root / "configs" / "gemma_270m_cpu.yaml")])
    registry = TaskRegistry.load(root / cfg.data.task_config)
    assert cfg.data.train_data == "outputs/recipe/mined_science"
    assert (registry.weight("squad"), registry.weight("bioasq"), registry.weight("pubmedqa")) == (
        0.4, 1.0, 1.0)  # fmt: skip
