"""The demo's post-training stages (9-12), on SmolLM2-135M-Instruct: SFT, on-policy pairs, DPO, RL.

Run by ``python -m megatron_seed.demo`` after pretraining (``--no-posttrain`` skips them). Sizes are
chosen to show every step of the path in a few minutes on 2 CPU cores, not to move pass@1: each
stage logs what it did and where its outputs are.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SFT_FIRST_TASK = 100  # the SFT set: CodeI/O tasks from here on
STARTER = 16  # problems in megatron_seed/evaluate/assets/starter_problems.jsonl
SFT_MAX_CHARS = 2400  # short tasks: a packed row of 1024 tokens holds two or three


def log(message: str, start: float) -> None:
    """A stage line with the seconds since post-training began."""
    print(f"[demo] {message} [{time.time() - start:.0f} s]", file=sys.stderr, flush=True)


def run(out: Path, args) -> int:
    from megatron_seed.convert.gguf import smollm2_hf_dir
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore

    from megatron_seed.checkpoint.layout import latest_checkpoint

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir()
    base = out / "smollm2"
    if latest_checkpoint(str(base)) is None:
        import torch

        hf_to_mcore(hf, str(base), torch.float32)
    code = sft(out, hf, base, args, start)
    if code:
        return code
    sft_ckpt = out / "sft_ckpt"
    from megatron_seed.convert.hf_checkpoint import mcore_to_hf

    mcore_to_hf(str(sft_ckpt), str(out / "sft_hf"))
    sft_pass = chat_pass_at_1(sft_ckpt, out / "humaneval_sft.jsonl", args.chat_eval_problems)
    log(f"9/12 sft: exported {out / 'sft_hf'} (Hugging Face); held-out HumanEval pass@1 of its chat replies "
        f"on {args.chat_eval_problems} problems: {sft_pass:.3f}", start)
    pairs = out / "pairs.jsonl"
    summary = build_pairs(sft_ckpt, pairs, args, start)
    scores = {"base": None, "SFT": sft_pass, "DPO": None, "RL": None}
    policy = sft_ckpt
    if summary["pairs_written"] == 0:
        log("11/12 dpo: no problem had both passing and failing replies, so there is nothing to prefer; "
            "more samples per problem (--pair-samples) give pairs", start)
    else:
        code = dpo(out, hf, sft_ckpt, pairs, args)
        if code:
            return code
        policy = out / "dpo_ckpt"
        scores["DPO"] = chat_pass_at_1(policy, out / "humaneval_dpo.jsonl", args.chat_eval_problems)
        record = [json.loads(line) for line in (out / "dpo_run" / "metrics.jsonl").read_text().splitlines()][-1]
        log(f"11/12 dpo: {args.dpo_steps} steps on {summary['pairs_written']} pairs: loss {record['loss']:.4f} "
            f"(ln 2 = 0.6931 at the start), rewards/accuracies {record['rewards/accuracies']:.2f}, margins "
            f"{record['rewards/margins']:.4f}; HumanEval pass@1 {sft_pass:.3f} after SFT -> {scores['DPO']:.3f} "
            "after DPO (a few steps on a handful of pairs: the path, not a gain)", start)
    if args.rl_steps:
        code = rl(out, hf, policy, args, start)
        if code:
            return code
        scores["RL"] = chat_pass_at_1(out / "rl_ckpt", out / "humaneval_rl.jsonl", args.chat_eval_problems)
        records = [json.loads(line) for line in (out / "rl_run" / "metrics.jsonl").read_text().splitlines()]
        log(f"12/12 rl: {args.rl_steps} steps from {policy.name}: reward_mean by step "
            f"{[round(r['reward_mean'], 3) for r in records]}, groups kept {[int(r['groups_kept']) for r in records]}, "
            f"logprob_diff (engine vs trainer) {records[-1]['logprob_diff']:.4f}", start)
    scores["base"] = chat_pass_at_1(base, out / "humaneval_base.jsonl", args.chat_eval_problems)
    log(f"12/12 held-out HumanEval pass@1 ({args.chat_eval_problems} problems, greedy chat replies): "
        + " | ".join(f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in scores.items())
        + " (a few steps each: the path, not a gain)", start)
    (out / "pass_at_1.json").write_text(json.dumps(scores, indent=2))
    return 0


def rl(out: Path, hf: str, policy: Path, args, start: float) -> int:
    from megatron_seed.rl import main as rl_main

    log(f"12/12 rl: {args.rl_steps} GRPO steps (DAPO's recipe) from {policy.name} on the starter problems: "
        "2 prompts x 4 rollouts per step from our engine, weights synced in memory, rewards from the unit "
        "tests in the sandbox", start)
    return rl_main([
        "--preset", "smollm2_135m", f"train.load={policy}", "train.finetune=true", f"data.tokenizer={hf}",
        "rl.problems=starter", "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=128",
        "rl.max_refill_rounds=1", "train.global_batch_size=8", "train.micro_batch_size=4", "data.seq_length=512",
        f"train.steps={args.rl_steps}", "optimizer.lr=1e-6", "optimizer.min_lr=1e-6", "optimizer.schedule=constant",
        "optimizer.warmup_steps=0", "train.log_interval=1", f"train.run_dir={out / 'rl_run'}",
        f"train.save={out / 'rl_ckpt'}", "train.save_optimizer=false", "train.tensorboard=false",
        f"data.cache_dir={out / 'cache'}",
    ])


def sft(out: Path, hf: str, base: Path, args, start: float) -> int:
    from megatron_seed.data.codeio import load_tasks, sft_record

    tasks = [t for t in load_tasks(limit=SFT_FIRST_TASK + 20 * args.sft_tasks)[SFT_FIRST_TASK:]
             if len(t.description) + len(t.io_spec) + len(t.solution) <= SFT_MAX_CHARS]
    valid_n = max(2, args.sft_tasks // 8)
    train, valid = tasks[:args.sft_tasks], tasks[args.sft_tasks:args.sft_tasks + valid_n]
    for name, part in (("sft_train.jsonl", train), ("sft_valid.jsonl", valid)):
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(sft_record(t)) + "\n" for t in part)
    log(f"9/12 sft: SmolLM2-135M-Instruct ({base}), {args.sft_steps} steps on {len(train)} CodeI/O tasks "
        f"(+{len(valid)} for validation), packed into rows of 1024 tokens", start)
    from megatron_seed.sft import main as sft_main

    return sft_main([
        "--preset", "smollm2_135m", f"train.load={base}", "train.finetune=true", f"data.tokenizer={hf}",
        f"data.train={out / 'sft_train.jsonl'}", f"data.valid={out / 'sft_valid.jsonl'}",
        f"data.cache_dir={out / 'cache'}", "data.seq_length=1024", f"train.steps={args.sft_steps}",
        "train.micro_batch_size=1", "train.global_batch_size=2", "train.log_interval=1",
        f"train.eval_interval={args.sft_steps}", "train.eval_steps=1", "optimizer.lr=1e-5", "optimizer.min_lr=1e-6",
        "optimizer.warmup_steps=0", f"train.run_dir={out / 'sft_run'}", f"train.save={out / 'sft_ckpt'}",
        "train.save_optimizer=false", "train.tensorboard=false",
    ])


def chat_pass_at_1(checkpoint: Path, results: Path, n_problems: int, problems=None,
                   max_new_tokens: int = 192) -> float:
    """Greedy chat replies of ``checkpoint`` to the first HumanEval problems (or ``problems``),
    judged in the sandbox."""
    from megatron_seed.evaluate.code import evaluate_chat
    from megatron_seed.inference.policy import load_policy
    from megatron_seed.evaluate.problems import load_human_eval
    from megatron_seed.sandbox import Sandbox

    model, chat = load_policy(checkpoint=str(checkpoint))
    problems = load_human_eval(limit=n_problems) if problems is None else problems
    with Sandbox(max_workers=2) as box:
        summary, rows = evaluate_chat(problems, model, chat, [1], box, max_new_tokens=max_new_tokens,
                                      progress=False)
    with open(results, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return summary["pass@1"]


def build_pairs(checkpoint: Path, pairs: Path, args, start: float) -> dict:
    from megatron_seed.evaluate.pairs import main as pairs_main

    log(f"10/12 pairs: the SFT model samples {args.pair_samples} replies to each of {args.pair_problems} starter "
        "problems (simple function tasks shipped with the package; their tests run in the sandbox)", start)
    code = pairs_main(["--checkpoint", str(checkpoint), "--problems", f"starter:{args.pair_problems}", "--n", str(args.pair_samples),
                       "--temperature", "0.8", "--max-new-tokens", "160", "--batch-size", str(2 * args.pair_samples),
                       "--output", str(pairs)])
    if code:
        raise SystemExit(code)
    summary = json.loads(Path(str(pairs).rsplit(".jsonl", 1)[0] + "_summary.json").read_text())
    log(f"10/12 pairs: problems in {summary['problems_in']} = paired {summary['paired']} + all passed "
        f"{summary['all_passed']} + all failed {summary['all_failed']} + errors {summary['errors']}; "
        f"samples {summary['samples_by_status']}; {summary['pairs_written']} pairs -> {pairs}", start)
    return summary


def dpo(out: Path, hf: str, sft_ckpt: Path, pairs: Path, args) -> int:
    from megatron_seed.dpo import main as dpo_main

    return dpo_main([
        "--preset", "smollm2_135m", f"train.load={sft_ckpt}", "train.finetune=true", f"data.tokenizer={hf}",
        f"data.train={pairs}", f"data.cache_dir={out / 'cache'}", "data.seq_length=512",
        f"train.steps={args.dpo_steps}", "train.micro_batch_size=1", "train.global_batch_size=2",
        "train.log_interval=1", "optimizer.lr=5e-6", "optimizer.min_lr=5e-7", "optimizer.warmup_steps=0",
        "dpo.beta=0.1", f"train.run_dir={out / 'dpo_run'}", f"train.save={out / 'dpo_ckpt'}",
        "train.save_optimizer=false", "train.tensorboard=false",
    ])
