"""What every kernel here shares: where Triton may run, and launch sizes.

Kernels load their inputs in any float dtype and compute in float32 (one rounding, at the store).
That is also what keeps them right under Triton's interpreter (``TRITON_INTERPRET=1``), whose
bf16 arithmetic is wrong; the interpreter is what the CPU tests use, never a training run.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Triton reads ``TRITON_INTERPRET`` when a kernel is decorated: it must be set before import."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter runs on CPU tensors."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got a {t.device.type} tensor); on a CPU they run only "
                "under TRITON_INTERPRET=1 (set before importing megatron_seed_kernels; slow, for tests). Training on CPU "
                "uses model.kernels=torch (what model.kernels=auto picks there).")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rows_per_program(row_width: int, budget: int | None = None) -> int:
    """Rows handled by one program: enough to fill ~``budget`` elements. Interpreted, each program
    costs milliseconds, so many rows per program; compiled, a few rows keep registers in check."""
    if budget is None:
        budget = 1 << 16 if interpreting() else 1 << 12
    return max(1, min(128, budget // next_power_of_2(row_width)))
