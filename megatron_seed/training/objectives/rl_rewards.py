"""Rewards of RL rollouts: unit tests in the sandbox plus a format check, pluggable by import path.

A reward function (``rl.reward=package.module:function``) takes a batch, so that one sandbox
call runs every program of the batch in parallel::

    fn(problems: Sequence[Problem], texts: Sequence[Sequence[str]], sandbox, rl: RLConfig)
        -> list[list[RewardResult]]        # [problem][rollout], as texts

The default, :func:`unit_test_reward`: a reply whose format is right gets 1.0 when its program
passes the problem's tests (megatron_seed.evaluate.judge, the same judge as DPO pairs and pass@k)
and 0.0 otherwise; a reply with a format error gets ``rl.format_reward`` whatever its tests do
(they still run: ``passed`` is reported, for the pass rate and the curriculum).

Formats (``rl.format``): ``code_block``: the reply holds a closed fenced code block;
``think``: it opens with ``<think>``, closes it, and a closed fenced code block follows;
``none``: no check.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

_FENCED = re.compile(r"```[^\n`]*\n.*?```", re.S)


@dataclass(frozen=True)
class RewardResult:
    reward: float
    passed: bool       # the unit tests passed
    format_ok: bool
    status: str = ""   # the sandbox's status (passed, failed, timeout, ...)


RewardFn = Callable[..., list]


def format_ok(text: str, fmt: str) -> bool:
    if fmt == "none":
        return True
    if fmt == "code_block":
        return _FENCED.search(text) is not None
    if fmt == "think":
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return False
        close = stripped.find("</think>")
        return close > 0 and _FENCED.search(stripped, close + len("</think>")) is not None
    raise ValueError(f"unknown format {fmt!r}: none, code_block or think")


def unit_test_reward(problems, texts: Sequence[Sequence[str]], sandbox, rl) -> list[list[RewardResult]]:
    from megatron_seed.evaluate.judge import judge

    verdicts = judge(problems, texts, sandbox, timeout=rl.test_timeout, progress=False)
    out = []
    for replies, row in zip(texts, verdicts):
        results = []
        for text, verdict in zip(replies, row):
            ok = format_ok(text, rl.format)
            reward = (1.0 if verdict.passed else 0.0) if ok else float(rl.format_reward)
            results.append(RewardResult(reward, verdict.passed, ok, verdict.status))
        out.append(results)
    return out


def load_reward_fn(spec: str) -> RewardFn:
    from megatron_seed.config.schema import ConfigError

    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"rl.reward={spec!r}: cannot import it ({err})") from err
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec!r} is not callable")
    return fn
