"""DAPO's data rules on crafted rewards: dynamic sampling, the format rule, the curriculum's
pass-rate pool (and its checkpointed state), soft overlong punishment, reward formats."""

from __future__ import annotations

import pytest

from megatron_seed.training.objectives.rl_rewards import format_ok
from megatron_seed.training.objectives.rl_sampling import (DROP_ALL_EQUAL, DROP_SOLVED_FORMAT, Group, PoolExhausted,
                                                           ProblemPool, overlong_reward, select_groups)


def group(problem, rewards, passed=None, format_ok_=None):
    n = len(rewards)
    return Group(problem, [1, 2], [[3]] * n, [[-0.5]] * n, ["stop"] * n, list(rewards),
                 list(passed if passed is not None else [r > 0 for r in rewards]),
                 list(format_ok_ if format_ok_ is not None else [True] * n))


def test_dynamic_sampling_drops_all_equal_groups_and_solved_groups_with_format_errors():
    groups = [group(0, [1, 0, 1, 0]),                       # mixed: kept
              group(1, [0, 0, 0, 0]),                       # all failed: all equal
              group(2, [1, 1, 1, 1]),                       # all passed, format fine: all equal
              group(3, [1, 0, 1, 1], passed=[True] * 4, format_ok_=[True, False, True, True]),  # solved, bad format
              group(4, [0.5, 0.5, 0.25, 0.5])]              # unequal rewards: kept
    kept, dropped = select_groups(groups, dynamic_sampling=True)
    assert [g.problem for g in kept] == [0, 4]
    assert dropped == {DROP_ALL_EQUAL: 2, DROP_SOLVED_FORMAT: 1}
    kept, dropped = select_groups(groups, dynamic_sampling=False)  # the format rule holds regardless
    assert [g.problem for g in kept] == [0, 1, 2, 4] and dropped == {DROP_SOLVED_FORMAT: 1}


def test_pool_deals_every_problem_once_per_epoch_in_a_seeded_order():
    pool = ProblemPool(10, seed=3)
    first = pool.take(4) + pool.take(4) + pool.take(2)
    assert sorted(first) == list(range(10)) and pool.epoch == 0
    second = pool.take(10)
    assert sorted(second) == list(range(10)) and pool.epoch == 1 and second != first
    assert ProblemPool(10, seed=3).take(10) == first  # same seed, same order
    assert ProblemPool(10, seed=4).take(10) != first


def test_curriculum_retires_problems_above_the_pass_rate_and_resumes_from_its_state():
    pool = ProblemPool(4, seed=0, retire_pass_rate=0.875)
    pool.record(group(0, [1] * 8))                  # 8/8 = 1.0 > 0.875: retired
    pool.record(group(1, [1] * 7 + [0]))            # 7/8 = 0.875: stays (strictly above retires)
    pool.record(group(2, [1] * 8))
    pool.record(group(2, [0] * 8))                  # 8/16 after two groups: stays
    assert [pool.retired(p) for p in range(4)] == [True, False, False, False]
    assert pool.active() == 3 and pool.table()[2] == (8, 16)
    dealt = pool.take(3)
    assert 0 not in dealt and sorted(dealt) == [1, 2, 3]
    restored = ProblemPool(4, seed=0, retire_pass_rate=0.875)
    restored.load_state_dict(pool.state_dict())
    assert restored.table() == pool.table() and restored.take(5) == pool.take(5)
    for p in (1, 2, 3):
        pool.record(group(p, [1] * 64))
    with pytest.raises(PoolExhausted, match="left the pool"):
        pool.take(1)


def test_take_never_deals_a_problem_twice_in_one_call():
    pool = ProblemPool(3, seed=1)
    pool.record(group(0, [1] * 4))
    assert sorted(pool.take(5)) == [1, 2]


def test_soft_overlong_punishment_is_dapos_linear_ramp():
    assert overlong_reward(100, 128, 0, 1.0) == 0.0              # off
    assert overlong_reward(96, 128, 32, 1.0) == 0.0              # before the buffer
    assert overlong_reward(112, 128, 32, 1.0) == pytest.approx(-0.5)
    assert overlong_reward(128, 128, 32, 2.0) == pytest.approx(-2.0)


def test_reward_formats():
    block = "Here:\n```python\ndef f():\n    return 1\n```\n"
    assert format_ok(block, "code_block") and format_ok("x", "none")
    assert not format_ok("def f():\n    return 1", "code_block")
    assert not format_ok("```python\ndef f(): pass", "code_block")  # never closed
    assert format_ok("<think>plan</think>\n" + block, "think")
    assert not format_ok(block, "think")
    assert not format_ok("<think>" + block + "</think>", "think")  # the code must follow the thinking
    assert not format_ok("<think>plan\n" + block, "think")
