"""Many sandbox jobs, run a batch at a time so a caller can report progress and keep results as they
come (pass@k, the judge, CodeI/O test generation all do)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from megatron_seed.sandbox.runner import Result


@dataclass(frozen=True)
class Batch:
    start: int              # index of the batch's first job
    results: list[Result]   # in job order
    done: int               # jobs finished so far, this batch included
    total: int
    seconds: float          # since the first batch started

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)


def run_in_batches(sandbox, jobs: Sequence[dict], per_worker: int = 8) -> Iterator[Batch]:
    """``sandbox.run_many`` over ``jobs`` in batches of ``per_worker`` jobs per worker (enough to keep
    every worker busy, few enough that progress shows)."""
    size = max(sandbox.max_workers * per_worker, 1)
    start = time.time()
    for lo in range(0, len(jobs), size):
        results = sandbox.run_many(list(jobs[lo:lo + size]))
        yield Batch(lo, results, lo + len(results), len(jobs), time.time() - start)
