"""What the fine-tuning benches (bench/sft.py, bench/dpo.py) share: the SmolLM2 checkpoints both
sides load, the optimizer settings both sides use, our trainer run in the bench's own process, a
step clock for TRL's trainer, TRL's common training arguments, and the parent's side: each side
run in a process of its own (bench/isolated.py), repeats, the best run per side, load warnings.

Each side reports ``marks``: (seconds, cumulative real tokens) at the start of training and at
the end of every optimizer step, from which :func:`throughput` takes tokens/s over the steps after
the warm-up ones.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence

from isolated import SideFailed, peak_rss_gib, run_side

SEED = 1234
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Optim:
    """One AdamW setting for both sides: each trainer's own defaults differ (TRL's beta2 0.999, ours 0.95)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0

    def line(self) -> str:
        return f"AdamW lr {self.lr:g} (constant) betas {self.betas} wd {self.weight_decay:g} clip {self.clip:g}"

    def overrides(self) -> list[str]:
        """This setting as our trainer's ``optimizer.*`` overrides (constant LR, no warm-up)."""
        return [f"optimizer.lr={self.lr}", f"optimizer.min_lr={self.lr}", "optimizer.schedule=constant",
                "optimizer.warmup_steps=0", f"optimizer.weight_decay={self.weight_decay}",
                f"optimizer.adam_beta1={self.betas[0]}", f"optimizer.adam_beta2={self.betas[1]}",
                f"optimizer.adam_eps={self.eps}", f"optimizer.clip_grad={self.clip}"]


# ---------------------------------------------------------------------------------------- inputs
def smollm2_checkpoints() -> tuple[str, str]:
    """(HF directory, our megatron checkpoint) of SmolLM2-135M-Instruct, converted once and cached."""
    import torch

    from megatron_seed.convert.gguf import smollm2_hf_dir
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore

    hf = smollm2_hf_dir()
    ours = os.path.join(os.path.dirname(hf), "smollm2_mcore")
    if not os.path.isdir(ours):
        tmp = f"{ours}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # renamed into place only when complete, so an interrupted conversion is redone
            hf_to_mcore(hf, tmp, torch.float32)
            os.replace(tmp, ours)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return hf, ours


def model_line(hf_dir: str) -> str:
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    return (f"model: SmolLM2-135M-Instruct ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV, vocab {cfg['vocab_size']})")


def precision_line(requested: str) -> tuple[str, str]:
    """(the precision both sides run in, the header line naming the CPU and why that precision)."""
    from megatron_seed.platform.precision import choose, cpu_description

    choice = choose(requested, "cpu")
    return choice.precision, f"CPU: {cpu_description()} | precision {choice.precision} ({choice.reason})"


def throughput(marks: Sequence[Sequence[float]], warmup: int) -> dict:
    """``marks[k]`` = (time, cumulative real tokens) at the end of step k (``marks[0]``: the start).
    Tokens/s over the steps after ``warmup``, and their median step time."""
    steps = [(marks[k][0] - marks[k - 1][0], marks[k][1] - marks[k - 1][1]) for k in range(warmup + 1, len(marks))]
    seconds, tokens = sum(s for s, _ in steps), sum(t for _, t in steps)
    return {"tokens_per_s": tokens / seconds, "median_step_s": statistics.median(s for s, _ in steps),
            "measured_tokens": tokens, "measured_steps": len(steps)}


def step_tokens(marks: Sequence[Sequence[float]]) -> list[int]:
    """Real tokens of each step, from the marks."""
    return [round(marks[k][1] - marks[k - 1][1]) for k in range(1, len(marks))]


# ------------------------------------------------------------------------------------ our side
def run_ours(entry: Callable[[list], int], *, name: str, workdir: str, ckpt: str, hf: str, data: str, seq: int,
             micro_batch: int, global_batch: int, steps: int, precision: str, optim: Optim,
             overrides: Sequence[str] = ()) -> dict:
    """``entry`` (``megatron_seed.sft.main`` or ``megatron_seed.dpo.main``) fine-tuning ``ckpt`` in this
    process, one metrics record per step, rows of ``seq`` packed tokens, ``global_batch`` rows per
    step in micro-batches of ``micro_batch``, no activation recomputation. Returns the run's metrics
    records, its ``marks``, its data cache directory, peak RSS, load and threads."""
    import torch

    # One process, no launcher: the process group is set up from these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # Per process: the run log is appended to, and a repeat must tokenize (and, for DPO, score the
    # reference) anew like the first run.
    run_dir, cache = (os.path.join(workdir, f"{name}_{part}_{os.getpid()}") for part in ("run", "cache"))
    argv = ["--preset", "smollm2_135m", f"train.load={ckpt}", "train.finetune=true",
            f"data.train={data}", f"data.tokenizer={hf}", f"data.cache_dir={cache}",
            f"data.seq_length={seq}", "data.packing=true", "data.train_on_all_tokens=false",
            f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={global_batch}",
            f"train.steps={steps}", f"train.precision={precision}", "train.recompute=none",
            f"train.seed={SEED}", f"train.run_dir={run_dir}", "train.tensorboard=false", "train.log_interval=1",
            *optim.overrides(), *overrides]
    status = entry(argv)
    if status:
        raise SystemExit(f"{entry.__module__} exited with status {status}")
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # Each record covers the time since the previous one (train.log_interval=1): one step.
    marks, clock, tokens = [(0.0, 0.0)], 0.0, 0.0
    for r in records:
        clock, tokens = clock + r["step_time_s"], tokens + r["tokens_per_s"] * r["step_time_s"]
        marks.append((clock, tokens))
    return {"records": records, "marks": marks, "cache": cache, "peak_rss_gib": peak, "load": load,
            "threads": torch.get_num_threads()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ TRL's side
def step_clock():
    """A TrainerCallback keeping ``marks``: (time, ``state.num_input_tokens_seen``) at the start of
    training and at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), float(state.num_input_tokens_seen)))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), float(state.num_input_tokens_seen)))

    return StepClock()


def trl_training_args(*, output_dir: str, precision: str, optim: Optim, micro_batch: int, accumulation: int,
                      steps: int) -> dict:
    """The TrainingArguments both TRL configs (SFTConfig, DPOConfig) get: the same optimizer as
    ours, fp32 weights with bf16 autocast when the precision is bf16 (accelerate's mixed
    precision), no gradient checkpointing (TRL's default turns it on; ours recomputes nothing),
    CPU only, nothing saved or reported."""
    return dict(
        output_dir=output_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, gradient_checkpointing=False, bf16=precision == "bf16", fp16=False, use_cpu=True,
        optim="adamw_torch_fused", learning_rate=optim.lr, adam_beta1=optim.betas[0], adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps, weight_decay=optim.weight_decay, max_grad_norm=optim.clip,
        lr_scheduler_type="constant", warmup_steps=0, seed=SEED, data_seed=SEED, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", push_to_hub=False,
        disable_tqdm=True)


def keep_freed_memory() -> None:
    """Our trainer's CPU allocator policy (train.cpu_reuse_freed_memory), for a TRL run that should
    have it too; call before torch allocates anything, as our trainer does at start-up."""
    from megatron_seed.platform.cpu_allocator import keep_freed_memory as keep

    keep()


# ---------------------------------------------------------------------------------- the parent
def child_env() -> dict:
    """The environment of a side: offline, and no launcher variables (each side is one process)."""
    env = dict(os.environ, **OFFLINE)
    for var in _LAUNCHER_VARS:
        env.pop(var, None)
    return env


def run_alternating(script: str, sides: Sequence[str], argv: Sequence[str], repeats: int) -> dict[str, list[dict]]:
    """Each side ``repeats`` times, the sides alternating (``python script --_child SIDE *argv``), so
    background load falls on all of them alike; each result gains ``wall_s``, its whole process's
    time. Raises SideFailed with the failing side's output."""
    env = child_env()
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            start = time.perf_counter()
            result = run_side(side, [os.path.abspath(script), "--_child", side, *argv], env)
            runs[side].append({**result, "wall_s": time.perf_counter() - start})
    return runs


def best_runs(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each side's fastest run (background load on a shared machine only ever slows a run down);
    peak memory the highest of its runs, so a repeat never flatters it."""
    return {side: {**max(rs, key=lambda r: r["tokens_per_s"]), "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                   "all_tokens_per_s": [round(r["tokens_per_s"]) for r in rs]} for side, rs in runs.items()}


def warn_if_shared(results: dict[str, dict]) -> None:
    """The 1-minute load average as a side finished counts its own busy threads; more than that
    means other processes shared the cores, which slows the side with more, smaller parallel
    regions far more than the other (each waits for a descheduled thread), so the ratio is off."""
    busy = {name: r["load"] for name, r in results.items() if r["load"] > r["threads"] + 1}
    if busy:
        print(f"[bench] WARNING: other processes were using the CPUs ({os.cpu_count()}) during the run: 1-minute "
              f"load {', '.join(f'{k} {v:.1f}' for k, v in busy.items())}; these figures are distorted, run it "
              f"again on an idle machine (or with --repeats)", flush=True)


def failed(err: SideFailed) -> int:
    print(f"[bench] FAILED: {err}", file=sys.stderr)
    return 1
