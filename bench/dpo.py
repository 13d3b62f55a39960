"""Direct preference optimization throughput and peak memory on CPU: megatron-seed vs TRL's DPOTrainer.

    python bench/dpo.py [--seq 1024] [--pairs 4] [--micro-batch 1] [--warmup 2] [--steps 3] [--repeats 1]
                        [--precision auto|bf16|fp32] [--ours "key=value ..."] [--quick]

Model: SmolLM2-135M-Instruct, as in bench/sft.py (TRL loads the HF directory, ours the megatron
checkpoint converted from it). Pairs, built offline from reasoning-gym's CodeI/O tasks
(megatron_seed.data.codeio): prompt = the task's prompt, chosen = its reference solution,
rejected = the reference solution of the next task in the file (a complete, real program for
another problem), as conversational messages (TRL's standard format, which both trainers take).
Kept: the first pairs whose chosen and rejected sequences together fill more than half of a
``--seq`` row and fit in it, so that ours, which packs pairs whole into rows, holds exactly one
pair per row and so exactly ``--pairs`` pairs per optimizer step, as TRL does. There are
``(warmup + steps) x pairs`` of them: each side trains exactly one epoch, over the same pairs.

Same batches: the bench reads the order in which ours will take the pairs (its packing plan for
the run's seed, from the same code its trainer uses) and gives TRL the pairs in that order with
sequential sampling, so every step and micro-batch holds the same pairs on both sides; checked
afterwards: each step's real tokens must be equal on both sides. Same tokens: checked per
sequence, TRL's tokenized prompt + completion must equal ours, and its completion mask ours,
except that TRL's also covers the chat template's newline after ``<|im_end|>`` (one token per
sequence, also in its log-prob sum); the bench stops if they differ.

Ours: ``python -m megatron_seed.dpo``'s trainer, ``ref.mode=precomputed`` (one forward pass of a
reference model over every pair before training, then the reference model is freed),
``dpo.loss_type=sigmoid dpo.beta=0.1``, ``train.compile=true`` (``--ours`` replaces these extra
overrides), rows of ``--seq`` tokens holding the pair's two sequences as two blocks of the
block-diagonal causal mask (the rest padding), ``--micro-batch`` rows per micro-batch accumulated
to ``--pairs`` per step, in the precision the policy picks for this CPU (as bench/sft.py). TRL:
``DPOTrainer`` with ``precompute_ref_log_probs=True`` (one pass with the policy model itself, in
micro-batches of ``--micro-batch`` pairs, before training), ``loss_type=sigmoid``, ``beta=0.1``,
``max_length=--seq`` (no sequence is that long, so nothing is truncated), padding (TRL 1.16 turns
``padding_free`` off for DPO: each micro-batch is its pairs' chosen and rejected sequences
right-padded to the longest), gradient checkpointing off, fp32 weights with bf16 autocast when
the precision is bf16. Both: the same AdamW setting, constant learning rate, gradient clipping.

Memory goal: ours' DPO peak RSS against our own SFT (``python -m megatron_seed.sft``) on the
chosen sides as prompt/completion records, same rows, micro-batch, steps, precision and
overrides: with the reference log-probs precomputed no reference model stays resident, so DPO
should hold at most 1.1x what SFT holds. Each side runs in its own process (bench/isolated.py).

Tokens/s: real (non-padding) tokens of the chosen and rejected sequences (the prompt counted in
each) over the ``--steps`` steps after ``--warmup`` untimed ones; the reference pass runs before
the first step on both sides, is not in the step timing, and is timed and printed on its own.
``--repeats N`` alternates the sides N times and keeps each side's fastest run (and its highest
peak). Prints each side, the ratios and whether each goal is met: (1) ours at least 1.5x TRL's
tokens/s; (2) ours' DPO peak RSS at most 1.1x ours' SFT. A side that fails stops the bench with
its output and exit status 1.

The losses by step are printed too. Step 1 is ln 2 on both sides (the policy is the reference);
after it they part: Adam's first updates are close to +-lr on every weight whatever its gradient's
size, so the sign of the many tiny gradient entries, which bf16 rounding decides differently in
the two implementations, weighs as much as the signal.
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
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune_common import (SEED, Optim, SideFailed, best_runs, failed, model_line, precision_line,  # noqa: E402
                             run_alternating, run_ours, smollm2_checkpoints, step_clock, step_tokens,
                             throughput, trl_training_args, warn_if_shared)
from isolated import peak_rss_gib, report  # noqa: E402

GOAL_SPEEDUP = 1.5
GOAL_MEMORY_VS_SFT = 1.1
OPTIM = Optim(lr=1e-6)  # TRL's DPO default
BETA = 0.1
SIDES = ("trl", "ours_dpo", "ours_sft")


# ---------------------------------------------------------------------------------------- inputs
def _messages(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def build_pairs(hf_dir: str, count: int, seq: int) -> tuple[list[dict], dict]:
    """The first ``count`` CodeI/O pairs whose two sequences fill more than half a ``seq`` row and
    fit in it (see the module docstring), and what was passed over."""
    from megatron_seed.data.chat import conversation_from_record, load_chat_tokenizer
    from megatron_seed.data.codeio import load_tasks, prompt_text, reply_text

    chat = load_chat_tokenizer(hf_dir)
    tasks = load_tasks()
    kept, tokens, passed = [], 0, Counter()
    for i, task in enumerate(tasks):
        chosen, rejected = reply_text(task), reply_text(tasks[(i + 1) % len(tasks)])
        if chosen == rejected:  # the same reference solution serves two tasks: no preference
            passed["same solution"] += 1
            continue
        record = {"prompt": _messages("user", prompt_text(task)), "chosen": _messages("assistant", chosen),
                  "rejected": _messages("assistant", rejected)}
        n = sum(len(chat.encode_conversation(conversation_from_record(
            {"prompt": record["prompt"], "completion": record[side]})).input_ids) for side in ("chosen", "rejected"))
        if n > seq:
            passed["longer"] += 1
            continue
        if 2 * n <= seq:
            passed["half a row or less"] += 1
            continue
        kept.append(record)
        tokens += n
        if len(kept) == count:
            break
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} CodeI/O pairs fit between half a row and a row of {seq} tokens; "
                         f"{count} are needed (fewer --pairs or --steps, or another --seq)")
    return kept, {"tokens": tokens, "passed": dict(passed)}


def ours_pair_order(hf_dir: str, path: str, cache: str, seq: int) -> tuple[list[int], object]:
    """The order in which our DPO trainer takes the pairs of ``path`` in its first epoch (its packing
    plan for the run's seed, from the classes its trainer uses), and our tokenized pairs."""
    from megatron_seed.data.chat import load_chat_tokenizer
    from megatron_seed.data.preference_data import build_pair_data
    from megatron_seed.training.objectives.dpo import PackedPairDataset

    chat = load_chat_tokenizer(hf_dir)
    data = build_pair_data([path], chat, cache, seq)
    if data.summary.skipped_total:  # every pair was measured to fit: a record ours rejects is a bench bug
        raise SystemExit(f"ours skipped pairs of {path}: {data.summary.line()}")
    rows = PackedPairDataset(data, seq, chat.pad_id, SEED).plan(0).rows
    if any(len(r) != 1 for r in rows):  # the selection rule makes this impossible: a bench bug
        raise SystemExit(f"ours packs {sorted(len(r) for r in rows)} pairs per row, not one each")
    return [int(r[0]) for r in rows], data


def check_same_tokens(ours_data, order: list[int], trl_tokens: list[dict]) -> str:
    """'' when TRL tokenized every sequence as ours (ids; completion mask but for TRL's trailing
    newline), else what differs first."""
    import numpy as np

    if len(trl_tokens) != len(order):
        return f"TRL kept {len(trl_tokens)} pairs, ours {len(order)}"
    for j, theirs in zip(order, trl_tokens):
        for side, (ids, mask) in zip(("chosen", "rejected"), ours_data.pair(j)):
            prompt, completion = theirs["prompt"], theirs[side]
            trl_ids = prompt + completion
            trl_mask = [0] * len(prompt) + [1] * len(completion)
            ids, mask = np.asarray(ids).tolist(), np.asarray(mask).astype(int).tolist()
            if trl_ids != ids:
                first = next((t for t, (x, y) in enumerate(zip(trl_ids, ids)) if x != y), min(len(ids), len(trl_ids)))
                return (f"pair {j} {side}: TRL has {len(trl_ids)} ids, ours {len(ids)}, first difference at "
                        f"token {first}")
            # Ours ends the completion mask at <|im_end|>; TRL's also covers the newline after it.
            if trl_mask[:-1] != mask[:-1] or mask[-1] != 0 or trl_mask[-1] != 1:
                return f"pair {j} {side}: the completion masks differ beyond TRL's trailing newline"
    return ""


# ------------------------------------------------------------------------------------ the sides
def _ours_common(a: argparse.Namespace, precision: str) -> dict:
    return {"workdir": a.workdir, "ckpt": a.ckpt, "hf": a.hf, "seq": a.seq, "micro_batch": a.micro_batch,
            "global_batch": a.pairs, "steps": a.warmup + a.steps, "precision": precision, "optim": OPTIM}


def _ours_dpo(a: argparse.Namespace, precision: str) -> dict:
    import megatron_seed.training.objectives.dpo as dpo_objective
    from megatron_seed.dpo import main as dpo_main

    # The reference pass, timed where the objective calls it (once per split).
    passes, compute = [], dpo_objective.compute_reference_logps

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = compute(*args, **kwargs)
        passes.append(time.perf_counter() - start)
        return out

    dpo_objective.compute_reference_logps = timed
    run = run_ours(dpo_main, name="ours_dpo", data=a.pairs_ours, **_ours_common(a, precision),
                   overrides=["ref.mode=precomputed", "dpo.loss_type=sigmoid", f"dpo.beta={BETA}", *a.ours.split()])
    if not passes:
        raise SystemExit("our DPO run computed no reference log-probs (it found them cached)")
    records = run["records"]
    (summary_path,) = glob.glob(os.path.join(run["cache"], "dpo-*", "summary.json"))
    with open(summary_path) as f:
        summary = json.load(f)
    return {**throughput(run["marks"], a.warmup), "peak_rss_gib": run["peak_rss_gib"], "threads": run["threads"],
            "load": run["load"], "ref_pass_s": sum(passes), "pairs": summary["written"],
            "data_tokens": summary["tokens"], "step_tokens": step_tokens(run["marks"]),
            "pairs_per_step": [round(r["pairs"]) for r in records],
            "fill": statistics.mean(r["packing_efficiency"] for r in records[a.warmup:]),
            "first_logps_chosen": records[0]["logps/chosen"], "loss": [round(r["loss"], 4) for r in records]}


def _ours_sft(a: argparse.Namespace, precision: str) -> dict:
    from megatron_seed.sft import main as sft_main

    run = run_ours(sft_main, name="ours_sft", data=a.chosen_sft, **_ours_common(a, precision),
                   overrides=a.ours.split())
    return {**throughput(run["marks"], a.warmup), "peak_rss_gib": run["peak_rss_gib"], "threads": run["threads"],
            "load": run["load"],
            "fill": statistics.mean(r["packing_efficiency"] for r in run["records"][a.warmup:])}


def _trl(a: argparse.Namespace, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # The reference pass, timed where the trainer calls it (in its constructor).
    passes, precompute = [], DPOTrainer._precompute_ref_logps

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = precompute(self, *args, **kwargs)
        passes.append(time.perf_counter() - start)
        return out

    DPOTrainer._precompute_ref_logps = timed
    with open(a.pairs_trl, encoding="utf-8") as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(a.hf)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32, attn_implementation="sdpa")
    config = DPOConfig(
        max_length=a.seq, truncation_mode="keep_start", padding_free=False, pad_to_multiple_of=None,
        precompute_ref_log_probs=True, precompute_ref_batch_size=a.micro_batch, loss_type=["sigmoid"], beta=BETA,
        # The pairs come in the order ours takes them (see the module docstring).
        train_sampling_strategy="sequential",
        # The attention mask's sum: every real token, none of the padding.
        include_num_input_tokens_seen="non_padding",
        **trl_training_args(output_dir=os.path.join(a.workdir, "trl"), precision=precision, optim=OPTIM,
                            micro_batch=a.micro_batch, accumulation=a.pairs // a.micro_batch,
                            steps=a.warmup + a.steps),
    )
    clock = step_clock()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock])
    data = trainer.train_dataset
    tokens = [{"prompt": p, "chosen": c, "rejected": r}
              for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
    with open(os.path.join(a.workdir, "trl_tokens.json"), "w") as f:
        json.dump(tokens, f)
    trainer.train()
    peak, load = peak_rss_gib(), os.getloadavg()[0]
    # What the collator pads over the measured steps: each micro-batch is [2 x pairs, longest sequence].
    lengths = [(len(t["prompt"]) + len(t["chosen"]), len(t["prompt"]) + len(t["rejected"])) for t in tokens]
    real = slots = 0
    for lo in range(a.warmup * a.pairs, (a.warmup + a.steps) * a.pairs, a.micro_batch):
        batch = [n for pair in lengths[lo:lo + a.micro_batch] for n in pair]
        real, slots = real + sum(batch), slots + len(batch) * max(batch)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {**throughput(clock.marks, a.warmup), "peak_rss_gib": peak, "threads": torch.get_num_threads(),
            "load": load, "ref_pass_s": sum(passes), "pairs": len(tokens), "data_tokens": sum(map(sum, lengths)),
            "step_tokens": step_tokens(clock.marks), "fill": real / slots,
            "first_logps_chosen": logs[0]["logps/chosen"], "loss": [round(h["loss"], 4) for h in logs],
            "mixed_precision": str(trainer.accelerator.state.mixed_precision)}


# ----------------------------------------------------------------------------------------- main
def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _side_line(name: str, r: dict, repeats: int) -> str:
    runs_note = f", runs {r['all_tokens_per_s']}" if repeats > 1 else ""
    return (f"{name}: {r['tokens_per_s']:,.0f} tokens/s{runs_note} (median step {r['median_step_s']:.2f} s, "
            f"{r['measured_tokens']:,.0f} real tokens in {r['measured_steps']} steps, {r['threads']} threads, "
            f"load {r['load']:.1f}; process {r['wall_s']:.0f} s) | peak RSS {r['peak_rss_gib']:.2f} GiB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=1024,
                   help="ours: row length (one pair per row); TRL: max_length; the pairs are chosen to fit it")
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step, both sides")
    p.add_argument("--micro-batch", type=int, default=1,
                   help="pairs per micro-batch, both sides (divides --pairs): ours' rows, TRL's padded pairs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="all sides; auto = what megatron_seed.platform.precision picks on this CPU")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the sides this many times, alternating, and keep each side's fastest run "
                        "(background load on a shared machine only ever slows a run down)")
    p.add_argument("--ours", default="train.compile=true",
                   help="space-separated key=value overrides for our DPO and SFT runs (default: compile the "
                        "elementwise chains)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke run: one pair, one (timed) step, no warm-up, no compile")
    p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
    for hidden in ("--workdir", "--pairs-ours", "--pairs-trl", "--chosen-sft", "--hf", "--ckpt"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.pairs, a.micro_batch, a.warmup, a.steps = 1, 1, 0, 1
        if a.ours == p.get_default("ours"):
            a.ours = ""  # compiling would take longer than the whole smoke run
    if a.micro_batch < 1 or a.pairs % a.micro_batch:
        p.error(f"--micro-batch {a.micro_batch} must divide --pairs {a.pairs}")
    if a.warmup < 0 or a.steps < 1 or a.repeats < 1:
        p.error("--warmup must be >= 0, --steps and --repeats >= 1")

    precision, header = precision_line(a.precision)
    if a._child:
        report({"trl": _trl, "ours_dpo": _ours_dpo, "ours_sft": _ours_sft}[a._child](a, precision))
        return 0

    print(header, flush=True)
    a.hf, a.ckpt = smollm2_checkpoints()
    total_steps = a.warmup + a.steps
    a.workdir = tempfile.mkdtemp(prefix="bench_dpo_")
    try:
        pairs, info = build_pairs(a.hf, total_steps * a.pairs, a.seq)
        a.pairs_ours, a.pairs_trl, a.chosen_sft = (os.path.join(a.workdir, name) for name in
                                                   ("pairs.jsonl", "pairs_trl_order.jsonl", "chosen_sft.jsonl"))
        _write_jsonl(a.pairs_ours, pairs)
        order, ours_data = ours_pair_order(a.hf, a.pairs_ours, os.path.join(a.workdir, "plan_cache"), a.seq)
        _write_jsonl(a.pairs_trl, [pairs[j] for j in order])
        _write_jsonl(a.chosen_sft, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pairs])
        print(model_line(a.hf), flush=True)
        passed = ", ".join(f"{n} {why}" for why, n in info["passed"].items()) or "none"
        print(f"pairs: {len(pairs)} CodeI/O pairs (prompt: the task; chosen: its reference solution; rejected: the "
              f"next task's reference solution), {info['tokens']:,} tokens in their chosen + rejected sequences "
              f"(prompt in each); the first whose two sequences fill more than half a {a.seq}-token row and fit "
              f"in it (passed over: {passed})", flush=True)
        print(f"step: {a.pairs} pairs | ours: one pair per {a.seq}-token row (chosen and rejected two blocks of "
              f"the block-diagonal mask, the rest padding), micro-batch {a.micro_batch} row(s) x "
              f"{a.pairs // a.micro_batch} accumulated | TRL: micro-batch {a.micro_batch} pair(s) = "
              f"[{2 * a.micro_batch}, longest] right-padded (padding_free is off in TRL 1.16's DPO) x "
              f"{a.pairs // a.micro_batch} accumulated | the same pairs in every step on both sides (ours' packing "
              f"order, TRL sampling sequentially)", flush=True)
        print(f"both: {OPTIM.line()}, loss sigmoid beta {BETA:g}, no activation recomputation, reference "
              f"log-probs precomputed in one forward pass before training (not in the step timing) | "
              f"{a.warmup} warm-up + {a.steps} measured steps = one epoch"
              + (f", best of {a.repeats} runs per side" if a.repeats > 1 else "")
              + (f" | ours with {a.ours}" if a.ours else ""), flush=True)
        common = ["--seq", str(a.seq), "--pairs", str(a.pairs), "--micro-batch", str(a.micro_batch),
                  "--warmup", str(a.warmup), "--steps", str(a.steps), "--precision", precision, "--ours", a.ours,
                  "--workdir", a.workdir, "--pairs-ours", a.pairs_ours, "--pairs-trl", a.pairs_trl,
                  "--chosen-sft", a.chosen_sft, "--hf", a.hf, "--ckpt", a.ckpt]
        try:
            runs = run_alternating(__file__, SIDES, common, a.repeats)
        except SideFailed as err:
            return failed(err)
        with open(os.path.join(a.workdir, "trl_tokens.json")) as f:
            mismatch = check_same_tokens(ours_data, order, json.load(f))
    finally:
        shutil.rmtree(a.workdir, ignore_errors=True)

    results = best_runs(runs)
    ours, trl, sft = results["ours_dpo"], results["trl"], results["ours_sft"]
    print(f"{_side_line('ours DPO', ours, a.repeats)} | rows {100 * ours['fill']:.1f}% real tokens | reference "
          f"pass {ours['ref_pass_s']:.1f} s over {ours['pairs']} pairs | loss by step {ours['loss']}", flush=True)
    print(f"{_side_line(' TRL DPO', trl, a.repeats)} | padded micro-batches {100 * trl['fill']:.1f}% real tokens | "
          f"reference pass {trl['ref_pass_s']:.1f} s over {trl['pairs']} pairs | loss by step {trl['loss']} | "
          f"accelerate mixed precision {trl['mixed_precision']}", flush=True)
    print(f"{_side_line('ours SFT', sft, a.repeats)} | rows {100 * sft['fill']:.1f}% real tokens (the chosen "
          f"sides as prompt/completion, same rows, micro-batch and steps)", flush=True)
    warn_if_shared({"ours DPO": ours, "TRL DPO": trl, "ours SFT": sft})
    if mismatch:
        print(f"[bench] FAILED: the two sides did not tokenize the same sequences: {mismatch}", file=sys.stderr)
        return 1
    if ours["step_tokens"] != trl["step_tokens"] or ours["pairs_per_step"] != [a.pairs] * total_steps:
        print(f"[bench] FAILED: the two sides did not train on the same pairs per step: real tokens by step ours "
              f"{ours['step_tokens']}, TRL {trl['step_tokens']}; pairs by step ours {ours['pairs_per_step']}",
              file=sys.stderr)
        return 1
    print(f"same data: {2 * ours['pairs']} sequences tokenized identically ({ours['data_tokens']:,} tokens; TRL's "
          f"completion mask and log-prob also cover the newline after <|im_end|>, 1 token per sequence); "
          f"{a.pairs} pairs per step, real tokens by step equal on both sides {ours['step_tokens']}; step 1 "
          f"(policy = reference) logps/chosen ours {ours['first_logps_chosen']:.2f}, TRL "
          f"{trl['first_logps_chosen']:.2f}", flush=True)
    speedup = ours["tokens_per_s"] / trl["tokens_per_s"]
    vs_sft = ours["peak_rss_gib"] / sft["peak_rss_gib"]
    print(f"ratio: tokens/s ours / TRL = {speedup:.2f}x | peak RSS ours DPO / ours SFT = {vs_sft:.2f}x, ours DPO / "
          f"TRL DPO = {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x | reference pass ours / TRL = "
          f"{ours['ref_pass_s'] / trl['ref_pass_s']:.2f}x", flush=True)
    print(f"goal 1 (ours >= {GOAL_SPEEDUP}x TRL's tokens/s): {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}",
          flush=True)
    print(f"goal 2 (ours' DPO peak RSS within {GOAL_MEMORY_VS_SFT}x ours' SFT at the same shape): "
          f"{'met' if vs_sft <= GOAL_MEMORY_VS_SFT else 'NOT met'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
