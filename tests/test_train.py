"""End-to-end training runs on a tiny random decoder: sharding equivalence and exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conretriever.training.loop import lr_factor

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "training_data" / "demo"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO)
    return env


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--train_data", str(DEMO),
        "--output_dir", str(out),
        "--query_max_length", "32",
        "--doc_max_length", "48",
        "--n_hard_negative", "1",
        "--chunk_size", "2",
        "--learning_rate", "1e-3",
        "--warmup_steps", "1",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: int = 300) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weight(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two runs' trained weights agree. Adam divides each gradient by its own running
    magnitude, so where a gradient is near zero the reduction-order noise moves the weight by a
    fraction of lr (1e-3 here) whatever its size: 2.2e-5 in 1 of 2048 weights on an AVX-512
    Xeon. A real difference (a lost or doubled gradient) moves many weights by ~lr."""
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_lr_schedule_shapes():
    assert [lr_factor(s, 2, 6, "linear") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, 2, 6, "linear") == 0.0
    assert lr_factor(4, 2, 6, "cosine") == pytest.approx(0.5)
    assert lr_factor(5, 0, 6, "constant") == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("lora, topics", [("true", False), ("false", False), ("true", True)])
def test_two_process_fsdp_equals_one_process(tiny_decoder, tiny_encoder, tmp_path, monkeypatch,
                                             lora, topics):  # fmt: skip
    """2 ranks x 4 (FSDP2, gloo, cross-device negatives) == 1 process x 8: same losses, weights.
    With topic batches, rank 0's topics reach rank 1: the two ranks cut the same plan."""
    common = ["--max_steps", "3", "--use_lora", lora, "--lora_dropout", "0.0", "--seed", "7"]
    if topics:  # the teacher's vectors go to the store of this test's own cache
        monkeypatch.setenv("CONRETRIEVER_CACHE", str(tmp_path / "cache"))
        common += ["--embed_distil_model", str(tiny_encoder), "--topic_rows", "8"]
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    _run(
        [
            sys.executable,
            "-m",
            "conretriever",
            "train",
            *_args(tiny_decoder, single, "--per_device_train_batch_size", "8", *common),
        ]
    )
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", str(29500 + os.getpid() % 1000), "-m", "conretriever", "train",
          *_args(tiny_decoder, sharded, "--per_device_train_batch_size", "4",
                 "--cross_device_negatives", "true", *common)])  # fmt: skip
    # Tolerance: fp32, different reduction order (all-gather + reduce-scatter vs one matmul).
    assert _losses(sharded) == pytest.approx(_losses(single), abs=1e-5)
    w1, w2 = _weights(single), _weights(sharded)
    assert w1.keys() == w2.keys()
    moved = 0
    base = load_file(str(tiny_decoder / "model.safetensors"))
    for key in w1:
        assert_same_weight(w2[key], w1[key])
        moved += int(not torch.equal(w1[key], base[key]))
    assert moved > 0  # training changed the weights, so the comparison means something


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tiny_decoder, tmp_path):
    common = ["--max_steps", "12", "--save_steps", "3", "--save_total_limit", "2",
              "--per_device_train_batch_size", "4", "--lora_dropout", "0.1",
              "--seed", "3"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [sys.executable, "-m", "conretriever", "train"]
    _run(cmd + _args(tiny_decoder, full, *common))

    proc = subprocess.Popen(cmd + _args(tiny_decoder, killed, *common), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (killed / "checkpoint-6").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the kill must land mid-run"
    shutil.rmtree(killed / "tensorboard", ignore_errors=True)
    _run(cmd + _args(tiny_decoder, killed, *common, "--resume", "true"))

    assert _losses(killed) == _losses(full)
    w_full, w_resumed = _weights(full), _weights(killed)
    for key in w_full:
        torch.testing.assert_close(w_resumed[key], w_full[key], atol=0, rtol=0)
    assert len(list(killed.glob("checkpoint-*"))) <= 2  # rotation


@pytest.mark.slow
def test_fsdp_forced_on_one_process_trains_resumes_and_exports(tiny_decoder, tmp_path):
    """--fsdp true shards even at world size 1 (the multi-GPU code path on one device): the
    same losses and weights as the unsharded run, an exact resume, a loadable export."""
    common = ["--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
              "--lora_dropout", "0.1", "--seed", "3"]  # fmt: skip
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "conretriever", "train"]
    _run(cmd + _args(tiny_decoder, plain, *common))
    _run(cmd + _args(tiny_decoder, sharded, *common, "--fsdp", "true"))
    assert _losses(sharded) == pytest.approx(_losses(plain), abs=1e-5)
    first = _losses(sharded)
    _run(cmd + _args(tiny_decoder, sharded, *common, "--fsdp", "true", "--resume", "true"))
    assert _losses(sharded) == first  # resumed from checkpoint-2: steps 3-4 bit-identical
    w1, w2 = _weights(plain), _weights(sharded)
    for key in w1:
        assert_same_weight(w2[key], w1[key])


@pytest.mark.slow
def test_packed_chunks_equal_padded_chunks_under_two_process_fsdp(tiny_decoder, tmp_path):
    """torchrun x 2 (gloo, FSDP2, cross-device negatives, token-budget GradCache chunks):
    padding-free packed chunks train like padded ones (fp32: same losses and weights up to
    reduction order)."""
    common = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--lora_dropout", "0.0",
              "--chunk_size", "0", "--chunk_tokens", "96", "--seed", "11"]  # fmt: skip
    port = 29550 + os.getpid() % 1000
    outs = {}
    for packed in ("true", "false"):
        outs[packed] = tmp_path / f"packed_{packed}"
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(port + (packed == "true")), "-m", "conretriever", "train",
              *_args(tiny_decoder, outs[packed], *common, "--packed", packed)])  # fmt: skip
    assert _losses(outs["true"]) == pytest.approx(_losses(outs["false"]), abs=1e-5)
    w1, w2 = _weights(outs["false"]), _weights(outs["true"])
    for key in w1:
        assert_same_weight(w2[key], w1[key])


def test_full_fine_tuning_with_frozen_embeddings_keeps_them_and_resumes_exactly(
    tiny_decoder, tmp_path
):
    """``--use_lora false --freeze_embeddings true``: every weight but the token embeddings
    trains (the saved embedding matrix is the base model's, bit for bit; the layers moved),
    and a resume from a checkpoint continues with the same losses as the uninterrupted run."""
    common = ["--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4",
              "--use_lora", "false", "--freeze_embeddings", "true", "--seed", "3"]  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "conretriever", "train"]
    _run(cmd + _args(tiny_decoder, out, *common))
    first = _losses(out)
    base, tuned = load_file(str(tiny_decoder / "model.safetensors")), _weights(out)
    key = "embed_tokens.weight"
    assert torch.equal(tuned[key], base[key])
    moved = [k for k in tuned if k != key and not torch.equal(tuned[k], base[k])]
    assert "layers.0.self_attn.q_proj.weight" in moved and "layers.1.mlp.up_proj.weight" in moved
    shutil.rmtree(out / "checkpoint-4", ignore_errors=True)
    shutil.rmtree(out / "final")
    _run(cmd + _args(tiny_decoder, out, *common, "--resume", "true"))
    assert _losses(out) == first
    assert torch.equal(_weights(out)[key], base[key])


@pytest.mark.parametrize("user_value", [None, "8"])
def test_training_caps_the_kernel_cache_unless_the_user_set_it(
    tiny_decoder, tmp_path, monkeypatch, user_value
):
    """A training process caps oneDNN's kernel cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, read
    when oneDNN builds its first kernel) at 64: with the default 1,024 a bf16 recipe run grew
    from 5 to 10 GB and its steps slowed 1.7x. A value the user set is kept."""
    from conretriever.cli import main as cli
    from conretriever.runtime import ONEDNN_CACHE_CAPACITY

    if user_value is None:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", user_value)
    out = tmp_path / "run"
    assert cli(["train", *_args(tiny_decoder, out, "--max_steps", "1")]) == 0
    assert len(_losses(out)) == 1
    expected = user_value or ONEDNN_CACHE_CAPACITY
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == expected == (user_value or "64")
