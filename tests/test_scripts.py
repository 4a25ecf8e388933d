"""The shell entry point runs end to end: train, evaluate trained and untrained, compare."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conretriever.evaluation.compare import load_results

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_eval_script_on_a_tiny_model(tiny_decoder, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    env = dict(
        os.environ,
        CONFIG="configs/demo.yaml",
        OUTPUT_DIR=str(out),
        EVAL_DATA=str(REPO / "eval_data" / "demo"),
        CONRETRIEVER_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        REFERENCE=str(tiny_encoder),
    )
    flags = ["--model_name_or_path", str(tiny_decoder), "--max_steps", "2",
             "--mixed_precision", "no", "--report_to", "none"]  # fmt: skip
    proc = subprocess.run(
        ["bash", "scripts/train_eval_llm_retriever.sh", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "config.yaml").read_text().count(str(tiny_decoder)) == 1
    trained, base = load_results(out / "eval_trained"), load_results(out / "eval_base")
    assert set(trained) == set(base) == {"demo"}
    table = (out / "comparison.md").read_text()
    assert "| demo | untrained |" in table and "| demo | trained |" in table
    assert f"| demo | {tiny_encoder} (reference) |" in table
    assert "| demo | trained |" in proc.stdout  # the side-by-side table is printed
