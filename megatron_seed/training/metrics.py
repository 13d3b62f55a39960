"""Throughput accounting and the run log: progress lines, metrics.jsonl, TensorBoard.

Model FLOPs per token (training = forward + backward = 3x forward), dense decoder, counting
multiply-adds as 2 FLOPs:

    6 * N_matmul  +  6 * L * s * h

where ``N_matmul`` is the parameters used in matmuls (all but the input embedding and norms; the
output projection counted once even when tied), ``L`` layers, ``s`` sequence length and ``h``
hidden size (the second term is the QK^T and AV products with a full, not causal, attention
matrix, as in the PaLM appendix and Megatron-LM's reporting). TFLOP/s = FLOPs per token x tokens/s.
MFU = TFLOP/s per device / peak TFLOP/s per device; on GPU the peak comes from a small table of
dense bf16 peaks by device name, on CPU it is measured at start-up with a bf16 (or fp32) matmul.
Override with ``peak_tflops`` when you know better.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Optional

import torch

from megatron_seed.config.schema import ModelConfig

# The keys of every metrics.jsonl record, in order; an objective's other metrics follow them.
RECORD_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops", "mfu", "peak_mem_gib")

_GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "B200": 2250.0,
                         "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    h, layers = model.hidden_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * model.ffn_hidden_size) + model.vocab_size * h
    return 6.0 * matmul_params + 6.0 * layers * seq_length * h


def measure_cpu_peak_tflops(dtype=torch.bfloat16, n: int = 1024, seconds: float = 0.3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def device_peak_tflops(precision: str) -> float:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _GPU_PEAK_BF16_TFLOPS.items():
            if key in name:
                return value if precision == "bf16" else value / 2
        return float("nan")
    return measure_cpu_peak_tflops(torch.bfloat16 if precision == "bf16" else torch.float32)


def peak_memory_gib() -> float:
    """Peak device memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RunLogger:
    """Writes one JSON object per logged step to ``run_dir/metrics.jsonl`` and prints progress.

    Only the main rank writes. Progress lines go to stderr so stdout stays for results.
    """

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, tensorboard: bool = True,
                 stream=sys.stderr):
        self.enabled, self.total_steps, self.stream = enabled, total_steps, stream
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
        mfu = record.get("mfu")
        print(
            f"step {record['step']:>6}/{self.total_steps} | loss {record['loss']:.4f} | "
            f"lr {record['lr']:.3e} | grad norm {record['grad_norm']:.3f} | "
            f"{record['tokens_per_s']:,.0f} tok/s | {record['tflops']:.3f} TFLOP/s"
            + (f" | MFU {100 * mfu:.1f}%" if mfu is not None and mfu == mfu else "")
            + f" | peak mem {record['peak_mem_gib']:.2f} GiB"
            + "".join(f" | {key} {value:.4g}" for key, value in record.items()
                      if key not in RECORD_KEYS and isinstance(value, (int, float))),
            file=self.stream, flush=True,
        )

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def step_record(step: int, loss: float, lr: float, grad_norm: Optional[float], tokens: float,
                seconds: float, flops_token: float, world_size: int, peak_tflops: Optional[float],
                extra: Optional[dict[str, float]] = None) -> dict:
    """One metrics.jsonl line: RECORD_KEYS, then the objective's other metrics (``extra``).
    ``tokens``: real tokens processed in the ``seconds`` since the last record."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops = flops_token * tokens_per_s / 1e12
    record = {
        "step": step, "loss": loss, "lr": lr,
        "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
        "tokens_per_s": tokens_per_s, "step_time_s": seconds, "tflops": tflops,
        "mfu": (tflops / world_size / peak_tflops) if peak_tflops else None,
        "peak_mem_gib": peak_memory_gib(),
    }
    for key, value in (extra or {}).items():
        if key in record:
            raise ValueError(f"objective metric {key!r} would overwrite the run log's own {key!r}; rename it")
        record[key] = value
    return record
