"""``auto`` precision follows the machine: bf16 only where it is native, fp32 elsewhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from conretriever import precision

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be an x86 CPU with the given torch capability and /proc/cpuinfo flags."""

    def make(capability: str, flags: set[str] | None):
        monkeypatch.delenv("CONRETRIEVER_CPU_BF16", raising=False)
        monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
        precision.cpu_bf16_support.cache_clear()

    yield make
    precision.cpu_bf16_support.cache_clear()


def test_auto_is_fp32_on_an_avx2_only_cpu(cpu):
    cpu("AVX2", {"avx2", "fma", "f16c"})
    assert not precision.use_mixed_bf16("auto", "cpu")
    assert precision.resolve_dtype("auto", "cpu") is torch.float32
    assert "AVX2" in precision.cpu_bf16_support()[1]


def test_auto_is_fp32_on_avx512_without_bf16_flags(cpu):
    cpu("AVX512", {"avx2", "avx512f", "avx512bw"})
    assert precision.resolve_dtype("auto", "cpu") is torch.float32


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_where_the_cpu_has_it(cpu, flag):
    cpu("AVX512", {"avx2", "avx512f", flag})
    assert precision.use_mixed_bf16("auto", "cpu")
    assert precision.resolve_dtype("auto", "cpu") is torch.bfloat16


def test_torch_capability_downgrade_wins_over_flags(cpu):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine: torch's kernels are AVX2, bf16 is emulated
    cpu("AVX2", {"avx512f", "avx512_bf16"})
    assert not precision.cpu_has_native_bf16()


def test_unknown_cpu_falls_back_to_a_timed_matmul(cpu, monkeypatch):
    cpu("AVX512", None)  # no /proc/cpuinfo
    calls = []
    monkeypatch.setattr(precision, "_timed_bf16_is_fast", lambda: calls.append(1) or True)
    assert precision.cpu_has_native_bf16() and precision.cpu_has_native_bf16()
    assert calls == [1]  # once per process


def test_environment_override(monkeypatch):
    precision.cpu_bf16_support.cache_clear()
    monkeypatch.setenv("CONRETRIEVER_CPU_BF16", "1")
    assert precision.cpu_has_native_bf16()
    precision.cpu_bf16_support.cache_clear()
    monkeypatch.setenv("CONRETRIEVER_CPU_BF16", "0")
    assert not precision.cpu_has_native_bf16()
    precision.cpu_bf16_support.cache_clear()


def test_explicit_bf16_on_an_emulating_cpu_runs_after_one_warning(cpu, caplog):
    cpu("AVX2", {"avx2"})
    with caplog.at_level(logging.WARNING, logger="conretriever.precision"):
        assert precision.use_mixed_bf16("bf16", "cpu")
        assert precision.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("50-90x slower" in m and "\n" not in m for m in lines)


def test_explicit_fp32_and_gpu_auto(cpu):
    cpu("AVX512", {"avx512_bf16"})
    assert not precision.use_mixed_bf16("no", "cpu")
    assert precision.resolve_dtype("float32", "cpu") is torch.float32
    assert precision.use_mixed_bf16("auto", "cuda")  # every GPU we target has bf16


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="mixed_precision must be one of auto, bf16, no"):
        precision.use_mixed_bf16("fp8", "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.resolve_dtype("float8", "cpu")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_never_force_bf16(path):
    """A shipped config computes in bf16 only where the hardware does it natively (``auto``),
    or in fp32 everywhere (``no``: the CPU recipe, where bf16 autocast trained a worse model on
    an AMX Xeon in the same time); never ``bf16``, 50-90x slower on an AVX2-only CPU."""
    raw = yaml.safe_load(path.read_text())
    assert raw["train"].get("mixed_precision") in ("auto", "no"), f"{path.name}: mixed_precision"
    assert raw["model"].get("dtype", "auto") == "auto", f"{path.name}: dtype"
