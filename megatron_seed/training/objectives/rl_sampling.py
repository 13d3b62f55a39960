"""Which prompts an RL step samples and which of their rollout groups it trains on (DAPO's recipe).

* :class:`ProblemPool`: problems in a seeded order, epoch after epoch, as a cursor that is part
  of the checkpoint. It also keeps each problem's pass-rate table (tests passed / rollouts):
  the **curriculum**. A problem whose pass rate exceeds ``retire_pass_rate`` (Seed-Coder: 87.5%)
  leaves the pool; it teaches nothing more (its groups are nearly all-positive).
* :func:`select_groups`: **dynamic sampling** drops groups whose rewards are all equal (every
  advantage is zero: no gradient, yet they would dilute the token-level mean) and groups whose
  rollouts all passed the tests but include a format error (Seed-Coder's rule: a solved problem
  must not teach that the format does not matter, nor that it does where the answer is right).
* :func:`overlong_reward`: DAPO's soft overlong punishment, a reward penalty growing linearly over
  the last ``buffer`` tokens before the limit.

Everything here is plain Python on lists, so the rules are tested on crafted rewards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


class PoolExhausted(RuntimeError):
    """Every problem left the pool: the policy solves them all; add harder problems."""


@dataclass
class Group:
    """One prompt's rollouts and their scores (the same on every rank after the gather)."""
    problem: int                 # index into the run's problem list
    prompt_ids: list[int]
    responses: list[list[int]]   # generated token ids, end-of-turn token included when it stopped
    engine_logps: list[list[float]]  # the engine's log-prob of each generated token
    finish: list[str]            # "stop" | "length"
    rewards: list[float]
    passed: list[bool]           # unit tests passed (before any format or length adjustment)
    format_ok: list[bool]


@dataclass
class ProblemPool:
    """``size`` problems dealt in a seeded permutation per epoch, skipping retired ones."""
    size: int
    seed: int
    retire_pass_rate: float = 0.875
    epoch: int = 0
    position: int = 0
    passes: dict[int, int] = field(default_factory=dict)    # problem -> rollouts that passed
    rollouts: dict[int, int] = field(default_factory=dict)  # problem -> rollouts scored

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def pass_rate(self, problem: int) -> float:
        n = self.rollouts.get(problem, 0)
        return self.passes.get(problem, 0) / n if n else 0.0

    def retired(self, problem: int) -> bool:
        return self.rollouts.get(problem, 0) > 0 and self.pass_rate(problem) > self.retire_pass_rate

    def active(self) -> int:
        return sum(1 for p in range(self.size) if not self.retired(p))

    def take(self, k: int) -> list[int]:
        """The next ``k`` active problems (fewer only when fewer than ``k`` are active: a problem
        is not dealt twice in one call). Raises :class:`PoolExhausted` when none is active."""
        active = self.active()
        if active == 0:
            raise PoolExhausted(f"all {self.size} problems passed more than {self.retire_pass_rate:.1%} of their "
                                "rollouts and left the pool (rl.retire_pass_rate); add harder problems")
        out: list[int] = []
        while len(out) < min(k, active):
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            problem = int(self.order(self.epoch)[self.position])
            self.position += 1
            if not self.retired(problem) and problem not in out:
                out.append(problem)
        return out

    def record(self, group: Group) -> None:
        self.passes[group.problem] = self.passes.get(group.problem, 0) + sum(group.passed)
        self.rollouts[group.problem] = self.rollouts.get(group.problem, 0) + len(group.passed)

    def state_dict(self) -> dict:
        # String keys: the checkpoint's common part is saved as plain containers.
        return {"epoch": self.epoch, "position": self.position,
                "passes": {str(k): v for k, v in self.passes.items()},
                "rollouts": {str(k): v for k, v in self.rollouts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.passes = {int(k): int(v) for k, v in state["passes"].items()}
        self.rollouts = {int(k): int(v) for k, v in state["rollouts"].items()}

    def table(self) -> dict[int, tuple[int, int]]:
        """problem -> (passed, rollouts): the curriculum's pass-rate table."""
        return {p: (self.passes.get(p, 0), n) for p, n in sorted(self.rollouts.items())}


DROP_ALL_EQUAL = "all_equal_rewards"
DROP_SOLVED_FORMAT = "all_passed_with_format_errors"


def drop_reason(group: Group, dynamic_sampling: bool) -> str:
    """Why ``group`` is not trained on ("" = kept)."""
    if all(group.passed) and not all(group.format_ok):
        return DROP_SOLVED_FORMAT
    if dynamic_sampling and max(group.rewards) == min(group.rewards):
        return DROP_ALL_EQUAL
    return ""


def select_groups(groups: Sequence[Group], dynamic_sampling: bool) -> tuple[list[Group], Counter]:
    """(kept groups in order, dropped count per reason)."""
    kept, dropped = [], Counter()
    for group in groups:
        reason = drop_reason(group, dynamic_sampling)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(group)
    return kept, dropped


def overlong_reward(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to ``max_new_tokens - buffer`` tokens, then
    falling linearly to ``-penalty`` at ``max_new_tokens``; 0 when ``buffer`` is 0 (off)."""
    if buffer <= 0:
        return 0.0
    start = max_new_tokens - buffer
    if length <= start:
        return 0.0
    return -penalty * min(length - start, buffer) / buffer
