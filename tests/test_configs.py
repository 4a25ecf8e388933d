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
