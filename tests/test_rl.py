"""RL on the one trainer, end to end on a tiny model: exact resume (same sampled tokens, rewards
and losses), the same run under data / pipeline parallelism, the engine's log-probs equal to the
trainer's after every weight sync, dynamic sampling with its refill cap, steps with nothing to
train on, several updates per batch and the KL term. Rewards come from deterministic functions of
the reply text (tests/rl_test_rewards.py): a random tiny model never passes a unit test."""

from __future__ import annotations

import json

import pytest

from helpers import run_pretrain

TINY = ("--preset", "tiny", "data.tokenizer=byte", "model.vocab_size=512", "train.precision=fp32",
        "optimizer.warmup_steps=0")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_start")
    run_pretrain(root / "pre", *TINY, "data.seq_length=96", "data.mock=true", "train.steps=2",
                 f"train.save={root / 'ckpt'}")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"task_id": f"toy/{i}", "prompt": f"say {i}", "tests": "pass"}) + "\n"
                                for i in range(6)))
    return root / "ckpt", problems


def rl(run_dir, start, *extra, nproc=1, steps=2, reward="even_length"):
    ckpt, problems = start
    return run_pretrain(run_dir, *TINY, "data.seq_length=80", f"train.load={ckpt}", "train.finetune=true",
                        f"rl.problems={problems}", f"data.cache_dir={run_dir.parent / 'cache'}",
                        f"rl.reward=tests.rl_test_rewards:{reward}", "rl.prompts_per_step=2", "rl.group_size=4",
                        "rl.max_new_tokens=24", "rl.engine_batch_size=4", "rl.temperature=1.0",
                        "train.global_batch_size=8", "train.micro_batch_size=2", f"train.steps={steps}",
                        "optimizer.lr=1e-2", "optimizer.decay_steps=4", "rl.overlong_filter=false", *extra, nproc=nproc, module="megatron_seed.rl")


def records(run_dir):
    return read_jsonl(run_dir / "metrics.jsonl")


def sampled(run_dir):
    """step -> [(task, responses, rewards)] of the kept and dropped groups, last occurrence wins."""
    out = {}
    for line in read_jsonl(run_dir / "rollouts.jsonl"):
        out.setdefault(line["step"], []).append((line["task_id"], line["responses"], line["rewards"]))
    return out


def test_rl_learns_nothing_wrong_and_resumes_exactly(start, tmp_path):
    full = tmp_path / "full"
    rl(full, start, steps=4, reward="even_length")
    got = records(full)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r in got:
        for key in ("reward_mean", "pass_rate", "format_error_rate", "response_len_mean", "truncated_frac",
                    "groups_kept", "groups_dropped", "clip_frac", "entropy", "logprob_diff", "rollout_seconds",
                    "reward_seconds", "train_seconds", "sync_seconds", "rollout_tokens_per_s"):
            assert key in r, key
        # The engine samples from the weights the trainer has just synced, in fp32: its per-token
        # log-probs of the ids it returned equal megatron-core's on those same ids.
        assert r["logprob_diff"] < 1e-4, r["logprob_diff"]
        assert r["update_skipped"] == 0
    assert got[0]["clip_frac"] == 0.0  # one update per batch: the ratio is exactly 1
    # On-policy, the surrogate's value is -mean(advantage), ~0; its gradient is not.
    assert all(r["grad_norm"] > 0 for r in got) and len({r["entropy"] for r in got}) == 4

    # 2 steps, then a resumed run to 4: same tokens sampled, same rewards, same losses.
    part = tmp_path / "part"
    rl(part, start, f"train.save={part / 'ckpt'}", steps=2)
    rl(part, start, f"train.save={part / 'ckpt'}", f"train.load={part / 'ckpt'}", "train.finetune=false", steps=4)
    resumed = records(part)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "entropy", "grad_norm", "reward_mean", "logprob_diff"):
        assert [r[key] for r in resumed] == [r[key] for r in got], key
    assert sampled(part) == sampled(full)


@pytest.mark.parametrize("layout", [("parallel.pipeline=2",), ("train.micro_batch_size=1",)])
def test_rl_under_pipeline_and_data_parallelism_equals_one_process(start, tmp_path, layout):
    one = tmp_path / "one"
    rl(one, start, reward="even_length")
    two = tmp_path / "two"
    rl(two, start, *layout, reward="even_length", nproc=2)
    assert sampled(two) == sampled(one)  # prompts dealt to ranks, groups gathered in order
    for a, b in zip(records(one), records(two)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-5)
        assert a["reward_mean"] == b["reward_mean"]


def test_dynamic_sampling_refills_then_trains_on_what_it_has(start, tmp_path):
    run = tmp_path / "ds"
    rl(run, start, "rl.max_refill_rounds=1", reward="first_problem_only", steps=2)
    for r in records(run):
        # only toy/0 gives mixed rewards: at most one group kept, the rest dropped as all-equal
        assert r["groups_kept"] <= 1 and r["refill_rounds"] <= 1
        assert r["groups_dropped"] >= 1
    lines = read_jsonl(run / "rollouts.jsonl")
    assert all(line["kept"] == (line["task_id"] == "toy/0") for line in lines)

    none = tmp_path / "none"
    rl(none, start, "rl.max_refill_rounds=2", reward="nothing", steps=2)
    for r in records(none):
        assert r["update_skipped"] == 1 and r["groups_kept"] == 0 and r["refill_rounds"] == 2


def test_overlong_filtering_trains_no_truncated_rollout(start, tmp_path):
    # The random tiny model never ends its turn: every rollout is cut at rl.max_new_tokens, so with
    # overlong filtering no token is trained and the steps make no update (logged, no crash).
    run = tmp_path / "overlong"
    rl(run, start, "rl.overlong_filter=true", steps=1)
    (r,) = records(run)
    assert r["truncated_frac"] == 1.0 and r["groups_kept"] >= 1 and r["update_skipped"] == 1


def test_several_updates_per_batch_and_the_kl_term(start, tmp_path):
    run = tmp_path / "kl"
    rl(run, start, "rl.updates_per_batch=2", "train.global_batch_size=4", "rl.kl_coef=0.1", "rl.tis_cap=2",
       steps=2)
    first, second = records(run)
    # Step 1: the policy is the reference and the old policy: KL 0, nothing clipped; the engine
    # sampled from the same fp32 weights, so the truncated importance weights are 1.
    assert first["kl"] == pytest.approx(0.0, abs=1e-7) and first["clip_frac"] == 0.0
    assert first["tis_weight"] == pytest.approx(1.0, abs=1e-4)
    # Step 2 trains the batch's second half with the weights step 1 changed: it moved off both.
    assert second["kl"] > 0
    lines = read_jsonl(run / "rollouts.jsonl")
    assert {line["step"] for line in lines} == {1}  # one rollout batch served both updates
