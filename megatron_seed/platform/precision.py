"""The precision policy: which floating-point type a job computes in, chosen from the hardware.

Every place that picks a compute dtype (training, the inference engine, ``generate``, the curation
oracle and scorer, the demo, the benches, post-training) asks :func:`resolve` with the user's
setting. ``auto`` (the default everywhere) picks

* ``bf16`` on a CUDA device that supports it;
* ``bf16`` on a CPU that multiplies bf16 matrices natively (AVX512-BF16 or AMX), and
* ``fp32`` on every other CPU.

Why measured rather than read from CPU flags: on an AVX2-only CPU torch *emulates* bf16, and a
2048^2 bf16 matmul ran at 0.2 GFLOP/s against 85 GFLOP/s in fp32 (AMD EPYC Zen 3): ~400x slower.
The same slowdown appears on a newer CPU held to AVX2 with ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2`` while its CPUID flags still say AMX. So the probe times a 256^3 matmul
in both types (a few ms; ~60 ms where bf16 is emulated) and calls bf16 native when it is at least
as fast as fp32. Measured: AMX (Sapphire Rapids class) bf16/fp32 time ratio 0.47; the same CPU
held to AVX2 96x.

An explicit ``bf16`` on a CPU without native support still runs, with a warning that gives the
measured slowdown. The probe runs once per process (it only reads the hardware); the choice and
its reason are logged once per process and setting.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# bf16 counts as native when its matmul takes at most this fraction of fp32's time.
NATIVE_BF16_MAX_TIME_RATIO = 1.0
_PROBE_SIZE = 256


@dataclass(frozen=True)
class Bf16Probe:
    native: bool
    slowdown: float  # bf16 time / fp32 time for the probe matmul (< 1: bf16 is faster)
    device: str  # what was probed, for messages: "cuda: NVIDIA H100" or the CPU's name and ISA


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16" or "fp32"
    requested: str
    reason: str
    emulated: bool = False  # bf16 chosen where the hardware only emulates it (warned about)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def cpu_description() -> str:
    """The CPU's model name and what torch uses of it, e.g.
    ``Intel(R) Xeon(R) Processor | torch ISA AVX512 | AMX, AVX512-BF16``. Benchmarks print it
    next to every figure."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        import platform

        name = platform.processor() or name
    features = []
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        features.append("AMX")
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        features.append("AVX512-BF16")
    isa = torch.backends.cpu.get_cpu_capability()
    limited = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
               if os.environ.get(k)]
    text = f"{name} | torch ISA {isa} | {', '.join(features) or 'no AMX/AVX512-BF16'}"
    return text + (f" | held by {' '.join(limited)}" if limited else "")


def _time_matmul(dtype: torch.dtype, n: int, reps: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # first call pays for kernel selection and packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def probe_bf16(device_type: str = "cpu") -> Bf16Probe:
    """Whether ``device_type`` computes bf16 natively; measured on CPU (see the module doc)."""
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return Bf16Probe(torch.cuda.is_bf16_supported(), 1.0, f"cuda: {name}")
    if device_type != "cpu":
        return Bf16Probe(False, float("nan"), device_type)
    with torch.no_grad():
        fp32 = _time_matmul(torch.float32, _PROBE_SIZE)
        bf16 = _time_matmul(torch.bfloat16, _PROBE_SIZE)
    ratio = bf16 / max(fp32, 1e-9)
    return Bf16Probe(ratio <= NATIVE_BF16_MAX_TIME_RATIO, ratio, cpu_description())


def choose(requested: str = "auto", device_type: Optional[str] = None) -> PrecisionChoice:
    """The precision to compute in for a ``requested`` setting (auto | bf16 | fp32)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, "fp32 requested")
    probe = probe_bf16(device_type)
    if requested == "bf16":
        if probe.native:
            return PrecisionChoice("bf16", requested, f"bf16 requested; native on {probe.device}")
        return PrecisionChoice("bf16", requested, (
            f"bf16 requested, but {probe.device} has no native bf16: its bf16 matmuls measured "
            f"{probe.slowdown:.0f}x slower than fp32; use precision auto or fp32 for full speed"), emulated=True)
    if probe.native:
        how = "" if device_type == "cuda" else f" (bf16 matmul {1 / probe.slowdown:.1f}x fp32's speed)"
        return PrecisionChoice("bf16", requested, f"auto -> bf16: native on {probe.device}{how}")
    return PrecisionChoice("fp32", requested, (
        f"auto -> fp32: {probe.device} emulates bf16 (bf16 matmul measured {probe.slowdown:.0f}x "
        "slower than fp32)"))


def resolve(requested: str = "auto", device_type: Optional[str] = None, log: bool = True) -> str:
    """:func:`choose`, returning "bf16" or "fp32"; logs the choice once per process and setting
    and warns when bf16 was asked for where it is emulated."""
    choice = choose(requested, device_type)
    if log:
        log_choice(choice)
    return choice.precision


def resolve_dtype(requested: str = "auto", device_type: Optional[str] = None, log: bool = True) -> torch.dtype:
    return DTYPES[resolve(requested, device_type, log)]


@functools.cache
def log_choice(choice: PrecisionChoice) -> None:
    if choice.emulated:
        warnings.warn(f"precision: {choice.reason}", RuntimeWarning, stacklevel=3)
    print(f"[precision] {choice.reason}", file=sys.stderr, flush=True)
