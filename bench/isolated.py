"""One side of a benchmark in a process of its own, so that the peak resident set size it reports
is its own and not the sum of everything the run has loaded.

The parent starts ``python BENCH --_child SIDE ...`` with :func:`run_side`; the child does its work
and ends with :func:`report`, one ``RESULT {json}`` line on stdout, which the parent parses. A side
that fails (non-zero exit, no result line) raises :class:`SideFailed` with the end of its output.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Optional

_PREFIX = "RESULT "


class SideFailed(RuntimeError):
    pass


def peak_rss_gib() -> float:
    """This process's resident set size high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def report(result: dict) -> None:
    print(_PREFIX + json.dumps(result), flush=True)


def run_side(name: str, argv: list, env: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
    """Run ``python *argv`` and return the dict its :func:`report` printed."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SideFailed(f"{name}: no result within {timeout:.0f} s") from e
    lines = [line for line in out.stdout.splitlines() if line.startswith(_PREFIX)]
    if out.returncode != 0 or not lines:
        tail = (out.stdout[-2000:] + "\n" + out.stderr[-4000:]).strip()
        raise SideFailed(f"{name} failed (exit status {out.returncode}):\n{tail}")
    return json.loads(lines[-1][len(_PREFIX):])
