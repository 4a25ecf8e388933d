"""Precision: which float type a run computes in, decided from the machine it runs on.

``auto`` (the default everywhere: ``mixed_precision`` for training, ``dtype`` for encoding and
evaluation) means bfloat16 where the hardware computes it natively and float32 elsewhere:

* **CUDA**: bfloat16 (every GPU we target has bf16 tensor cores).
* **CPU**: bfloat16 only when the CPU has native bf16 dot products (x86 ``avx512_bf16`` or
  ``amx_bf16``) AND torch dispatches its kernels at AVX-512 level. On an AVX2-only CPU (most
  laptops, many cloud machines) torch's bf16 GEMM falls back to a generic loop that is tens of
  times slower than float32 (measured: docs/training.md, "Machine timings"), so ``auto`` picks
  float32 there. Where the CPU flags cannot be read (no ``/proc/cpuinfo``, a
  non-x86 CPU), a tiny timed matmul decides, once per process.

``CONRETRIEVER_CPU_BF16=1`` / ``=0`` overrides the CPU detection (for a CPU we misjudge, and for
tests). An explicit ``bf16`` on a CPU without native support still runs, after a one-line
warning that says it will be slow and why.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time

import torch

log = logging.getLogger("conretriever.precision")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPE_CHOICES = ("auto", *DTYPES)
MIXED_PRECISION_CHOICES = ("auto", "bf16", "no")
_NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def _timed_bf16_is_fast() -> bool:
    """A 256x256 matmul in bf16 and in fp32, best of 3 each: native bf16 is faster than fp32,
    the generic fallback is tens of times slower. ~10 ms on a native CPU, ~0.2 s otherwise."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        a @ a  # warm-up: first calls pay for allocation and kernel selection
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU?, the reason in words). Decided once per process."""
    override = os.environ.get("CONRETRIEVER_CPU_BF16")
    if override in ("0", "1"):
        return override == "1", f"CONRETRIEVER_CPU_BF16={override}"
    capability = torch.backends.cpu.get_cpu_capability()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if "AVX512" not in capability:
            return False, f"torch CPU capability {capability} (no AVX-512 bf16 kernels)"
        flags = _cpu_flags()
        if flags is not None:
            native = sorted(flags & set(_NATIVE_FLAGS))
            if native:
                return True, f"CPU flags {','.join(native)}, torch capability {capability}"
            return False, f"no avx512_bf16/amx_bf16 CPU flag (torch capability {capability})"
    fast = _timed_bf16_is_fast()
    return fast, f"timed 256x256 matmul: bf16 {'faster' if fast else 'slower'} than fp32"


def cpu_has_native_bf16() -> bool:
    return cpu_bf16_support()[0]


def _device_type(device: torch.device | str | None) -> str:
    if device is None:
        from conretriever.runtime import default_device

        return default_device().type
    return torch.device(device).type


def bf16_is_native(device: torch.device | str | None) -> bool:
    """bfloat16 computes at full speed on ``device`` (CUDA, or a CPU with native bf16)."""
    kind = _device_type(device)
    if kind == "cuda":
        return True
    return kind == "cpu" and cpu_has_native_bf16()


def warn_slow_bf16(device: torch.device | str | None, what: str) -> None:
    """One line when bf16 was asked for explicitly on a CPU that emulates it."""
    if _device_type(device) == "cpu" and not cpu_has_native_bf16():
        reason = cpu_bf16_support()[1]
        log.warning(
            "%s: bf16 on this CPU runs through a generic kernel, 50-90x slower than float32 "
            "(%s); use 'auto' to get float32 here",
            what,
            reason,
        )


def use_mixed_bf16(setting: str, device: torch.device | str | None) -> bool:
    """``mixed_precision`` (auto | bf16 | no) -> compute in bf16 autocast?"""
    if setting not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {setting!r}"
        )
    if setting == "no":
        return False
    if setting == "bf16":
        warn_slow_bf16(device, "mixed_precision bf16")
        return True
    return bf16_is_native(device)


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device | str | None
) -> torch.dtype:
    """A weight dtype name (``auto`` | float32 | bfloat16 | float16 | float64) -> torch dtype.
    ``auto``: bfloat16 where it is native (see the module docstring), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if bf16_is_native(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype == "bfloat16":
        warn_slow_bf16(device, "dtype bfloat16")
    return DTYPES[dtype]


def describe(device: torch.device | str | None = None) -> str:
    """One line for logs: the device and what ``auto`` picks on it."""
    kind = _device_type(device)
    if kind == "cuda":
        return f"cuda ({torch.cuda.get_device_name()}): auto precision = bf16"
    native, reason = cpu_bf16_support()
    pick = "bf16" if native else "float32"
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}; {reason}): auto precision = {pick}"
