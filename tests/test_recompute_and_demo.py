import json

import pytest

from helpers import assert_losses_close, losses, run_cli, run_pretrain, subprocess_env


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_does_not_change_losses(tmp_path, mode):
    run_pretrain(tmp_path / "plain", "train.steps=3", "train.precision=fp32")
    run_pretrain(tmp_path / mode, "train.steps=3", "train.precision=fp32", f"train.recompute={mode}")
    assert_losses_close(losses(tmp_path / mode), losses(tmp_path / "plain"), atol=1e-6)


def test_demo_runs_the_whole_pipeline(tmp_path):
    import sys

    out = tmp_path / "demo"
    # run_cli: on timeout the demo's whole process group ends, not only the demo process. The demo
    # is one process at a time, so it gets every core, as a user's run does (the helpers pin the
    # suite's multi-process runs to one thread each).
    env = subprocess_env()
    del env["OMP_NUM_THREADS"]
    proc = run_cli([sys.executable, "-m", "megatron_seed.demo", "--out", str(out), "--max-files", "80",
                    "--site-packages-files", "20", "--oracle-sample", "8", "--sft-tasks", "8", "--sft-steps", "2",
                    "--pair-problems", "8", "--pair-samples", "3", "--dpo-steps", "2", "--rl-steps", "1",
                    "--chat-eval-problems", "1", "train.steps=20", "train.tensorboard=false"], timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Curation: the counts reconcile, the oracle labelled, the scorer trained, 10% were dropped.
    stats = json.loads((out / "curation" / "stats.json").read_text())
    assert stats["reconciles"] and stats["documents_in"] == 100 and 0 < stats["kept"] < 100
    assert stats["dropped"]["select/dropped_low_quality"] >= 1
    assert len((out / "curation" / "labels.jsonl").read_text().splitlines()) >= 4
    assert (out / "curation" / "scorer" / "scorer_metrics.json").exists()
    # Commit samples from this project's own history, or the line saying this copy has none.
    assert "3/12 commits" in proc.stderr
    assert "3/12 commits: skipped" in proc.stderr or \
        json.loads((out / "commits" / "commits_stats.json").read_text())["reconciles"]
    # Tokenizer and FIM preprocessing of exactly the kept files.
    summary = json.loads((out / "data" / "code_summary.json").read_text())
    assert summary["records_in"] == stats["kept"] == summary["written"]
    assert (out / "tokenizer" / "tokenizer.json").exists()
    got = losses(out)
    assert got[20] < got[5] - 0.3  # real code is learnable
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    # Long-context continuation: curation's repository-level documents, FIM 0.1, sequence 512,
    # from the first stage's weights; its checkpoint is the one exported and evaluated.
    repo_level = json.loads((out / "data" / "repo_level_summary.json").read_text())
    assert repo_level["written"] == repo_level["records_in"] > 0
    assert "6/12 pretrain, long context" in proc.stderr and "fine-tuning from the weights" in proc.stderr
    assert sorted(losses(out / "long_context")) == [4, 8]
    assert (out / "checkpoints_long" / "latest").read_text().strip() == "iter_0000008"
    assert "validation loss" in proc.stderr
    assert "7/12 export" in proc.stderr and (out / "hf" / "model.safetensors").exists()
    assert proc.stdout.startswith("def main(argv=None):")
    assert "8/12 evaluate" in proc.stderr and "pass@1" in proc.stderr
    samples = [json.loads(line) for line in (out / "humaneval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(isinstance(s["completion"], str) for s in samples)
    # Post-training on SmolLM2-135M-Instruct: SFT with validation, exported; pairs whose counts
    # reconcile; DPO from the SFT checkpoint starting at ln 2; chat pass@1 before and after.
    post = out / "posttrain"
    sft = [json.loads(line) for line in (post / "sft_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft] == [1, 2] and all(r["loss_tokens"] > 0 for r in sft)
    assert (post / "sft_hf" / "model.safetensors").exists() and "9/12 sft" in proc.stderr
    pairs = json.loads((post / "pairs_summary.json").read_text())
    assert pairs["problems_in"] == 8 == (pairs["paired"] + pairs["all_passed"] + pairs["all_failed"]
                                         + sum(pairs["errors"].values()))
    assert pairs["samples"] == 24 and "10/12 pairs" in proc.stderr
    # Seeded sampling at temperature 0.8: about half of the starter problems come out mixed.
    assert pairs["pairs_written"] > 0
    dpo = [json.loads(line) for line in (post / "dpo_run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(dpo[0]["loss"] - 0.6931) < 2e-3 and "rewards/accuracies" in dpo[0]
    assert "HumanEval pass@1" in proc.stderr and "after DPO" in proc.stderr
    assert "11/12 dpo" in proc.stderr
    # RL after DPO: one step, rollouts scored by the starter problems' tests; all four models scored.
    rl = [json.loads(line) for line in (post / "rl_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl] == [1] and "12/12 rl" in proc.stderr
    assert 0 <= rl[0]["pass_rate"] <= 1 and rl[0]["groups_kept"] + rl[0]["groups_dropped"] >= 2
    scores = json.loads((post / "pass_at_1.json").read_text())
    assert set(scores) == {"base", "SFT", "DPO", "RL"} and all(0 <= v <= 1 for v in scores.values())
