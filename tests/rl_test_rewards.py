"""Deterministic reward functions for RL tests (``rl.reward=tests.rl_test_rewards:NAME``): a random
tiny model never passes unit tests, so the tests score its replies by their text instead."""

from megatron_seed.training.objectives.rl_rewards import RewardResult


def even_length(problems, texts, sandbox, rl):
    """1 for a reply with an even number of characters: groups of mixed rewards."""
    return [[RewardResult(float(len(t) % 2 == 0), len(t) % 2 == 0, True) for t in row] for row in texts]


def first_problem_only(problems, texts, sandbox, rl):
    """Mixed rewards for the problem whose task id ends in '/0', all zero for the others: every
    other group is dropped by dynamic sampling."""
    out = []
    for problem, row in zip(problems, texts):
        varied = problem.task_id.endswith("/0")
        out.append([RewardResult(float(varied and i % 2 == 0), varied and i % 2 == 0, True) for i, _ in enumerate(row)])
    return out


def nothing(problems, texts, sandbox, rl):
    return [[RewardResult(0.0, False, True) for _ in row] for row in texts]
