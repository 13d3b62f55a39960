"""Staged runs (``stages:`` in a run config, megatron_seed.training.stages): the stages run in
sequence in one process, each from the previous one's final weights; a stopped run resumes in the
right stage at the right step; a mistake in a later stage stops the job before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, assert_losses_close, losses, run_pretrain

from megatron_seed.config import ConfigError

SCHEDULE = ROOT / "examples" / "tiny_schedule.yaml"


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The tiny schedule run end to end (a checkpoint every step, for the resume test)."""
    d = tmp_path_factory.mktemp("stages")
    proc = run_pretrain(d / "run", "--config", str(SCHEDULE), "train.save_interval=1")
    return d, proc.stderr


def test_stages_run_in_sequence_with_their_own_settings(staged):
    d, log = staged
    short, long = d / "run" / "1_short", d / "run" / "2_long"
    assert sorted(records(short)) == [1, 2, 3, 4] and sorted(records(long)) == [1, 2, 3]
    cfg1, cfg2 = (json.loads((s / "config.json").read_text()) for s in (short, long))
    assert (cfg1["data"]["seq_length"], cfg2["data"]["seq_length"]) == (32, 64)
    assert (cfg1["model"]["rotary_base"], cfg2["model"]["rotary_base"]) == (500000.0, 1000000.0)
    assert (cfg1["train"]["load"], cfg2["train"]["load"]) == (None, str(short / "checkpoints"))
    assert cfg2["train"]["finetune"] and not cfg2["train"]["finetune_load_optimizer"]
    # Each stage's own LR schedule (the LR logged at step k is the one step k trained with):
    # stage 1 from 3e-3 without warmup, stage 2 warms up again (step 1 at 0) to 1e-3, then decays.
    lr1 = [records(short)[s]["lr"] for s in (1, 2, 3, 4)]
    assert lr1[0] == pytest.approx(3e-3) and lr1 == sorted(lr1, reverse=True) and 1e-3 < lr1[3] < 2e-3
    lr2 = [records(long)[s]["lr"] for s in (1, 2, 3)]
    assert lr2[0] == 0 and lr2[1] == pytest.approx(1e-3) and 1e-4 < lr2[2] < 1e-3
    for stage, last in ((short, "iter_0000004"), (long, "iter_0000003")):
        assert (stage / "checkpoints" / "latest").read_text().strip() == last
    assert "stage 1/2 short: starting, 4 steps | seq 32" in log, log[-3000:]
    assert f"stage 2/2 long: starting from the weights of {short / 'checkpoints'}, 3 steps | seq 64" in log
    assert log.index("stage 1/2 short: finished at step 4") < log.index("stage 2/2 long: starting")


def test_second_stage_equals_a_run_started_from_the_first_stage_checkpoint(staged):
    """Stage 2 in the same process as stage 1 gives the losses of a fresh process given stage 1's
    checkpoint explicitly (train.load + train.finetune): it trains from stage 1's final weights
    and nothing carries over in the process between stages."""
    d, _ = staged
    stage2 = d / "run" / "2_long"
    # Stage 2's full config as it ran (train.load = stage 1's checkpoints), saved nowhere this time.
    run_pretrain(d / "alone", "--config", str(stage2 / "config.json"), "train.save=null", "train.save_interval=0")
    alone, chained = records(d / "alone"), records(stage2)
    assert [(alone[s]["loss"], alone[s]["lr"]) for s in (1, 2, 3)] == \
           [(chained[s]["loss"], chained[s]["lr"]) for s in (1, 2, 3)]
    # ... and those are trained weights, not a fresh initialisation (ln 272 = 5.6 at the start).
    assert chained[1]["loss"] < records(d / "run" / "1_short")[1]["loss"] - 0.1


def test_a_stopped_run_resumes_in_the_right_stage_at_the_right_step(staged):
    d, _ = staged
    run = d / "resumed"
    shutil.copytree(d / "run", run)
    # As if killed during stage 2's step 2: its newest checkpoint is step 1, metrics up to step 1.
    ckpts = run / "2_long" / "checkpoints"
    for step in (2, 3):
        shutil.rmtree(ckpts / f"iter_{step:07d}")
    (ckpts / "latest").write_text("iter_0000001\n")
    metrics = run / "2_long" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")

    log = run_pretrain(run, "--config", str(SCHEDULE), "train.save_interval=1").stderr
    assert "stage 1/2 short: complete (checkpoint at step 4 of 4), skipped" in log, log[-3000:]
    assert f"stage 2/2 long: resuming from {ckpts} at step 1 of 3" in log
    assert records(run / "1_short") == records(d / "run" / "1_short")  # not trained again
    want = records(d / "run" / "2_long")
    got = records(run / "2_long")
    assert sorted(got) == [1, 2, 3]
    assert [(got[s]["loss"], got[s]["lr"]) for s in (2, 3)] == [(want[s]["loss"], want[s]["lr"]) for s in (2, 3)]
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"

    # Once every stage is complete, running again trains nothing.
    log = run_pretrain(run, "--config", str(SCHEDULE)).stderr
    assert "stage 2/2 long: complete (checkpoint at step 3 of 3), skipped" in log
    assert len(records(run / "2_long")) == 3


def test_two_processes_run_the_same_stages(staged):
    """Under torchrun every rank plans and runs the same stages; with data parallelism the losses
    are the single process's (the pretrain loss is normalized over the global batch)."""
    d, _ = staged
    log = run_pretrain(d / "dp2", "--config", str(SCHEDULE), nproc=2).stderr
    assert log.count("stage 2/2 long: starting from the weights of") == 1  # logged by rank 0 only
    assert "world 2 (tp 1 pp 1 dp 2)" in log, log[-3000:]
    for stage in ("1_short", "2_long"):
        assert_losses_close(losses(d / "dp2" / stage), losses(d / "run" / stage), atol=1e-5)


def write_schedule(path: Path, **stage2_overrides) -> Path:
    spec = yaml.safe_load(SCHEDULE.read_text())
    spec["stages"][1]["overrides"].update(stage2_overrides)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_an_invalid_later_stage_stops_the_job_before_the_first_stage_trains(tmp_path):
    bad = write_schedule(tmp_path / "bad.yaml", **{"data.seq_length": 4096})
    proc = run_pretrain(tmp_path / "run", "--config", str(bad), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: stage 2/2 long: data.seq_length (4096) exceeds model.max_position_embeddings" in proc.stderr
    assert not (tmp_path / "run" / "1_short").exists()


def read(path, overrides=(), world_size=1, saved=None):
    from megatron_seed.training.stages import plan_stages, read_stages

    stages = read_stages(str(path), overrides)
    return plan_stages(stages, world_size, saved_step=(saved or {}).get)


def test_stage_config_errors_name_the_stage_and_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"stage 2/2 long: unknown config key 'optimizer.lrr'"):
        read(write_schedule(tmp_path / "a.yaml", **{"optimizer.lrr": 1e-3}))
    with pytest.raises(ConfigError, match=r"stage 2/2 long: model.hidden_size=128 differs from stage 1/2 short"):
        read(write_schedule(tmp_path / "b.yaml", **{"model.hidden_size": 128}))
    with pytest.raises(ConfigError, match=r"stage 2/2 long: train.save is set by the stage runner"):
        read(write_schedule(tmp_path / "c.yaml", **{"train.save": "/x"}))
    with pytest.raises(ConfigError, match=r"train.save=/x: a staged run saves each stage"):
        read(SCHEDULE, ["train.save=/x"])
    spec = yaml.safe_load(SCHEDULE.read_text())
    spec["stages"][1]["name"] = "short"
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"stage 2/2: the name 'short' is used by an earlier stage"):
        read(tmp_path / "d.yaml")
    # A staged file is not one run: load_config says where it goes instead of dropping the stages.
    from megatron_seed.config import load_config

    with pytest.raises(ConfigError, match="lists stages"):
        load_config(str(SCHEDULE))


def test_plan_follows_the_checkpoints_on_disk():
    short, long = "runs/tiny_schedule/1_short/checkpoints", "runs/tiny_schedule/2_long/checkpoints"
    fresh = read(SCHEDULE)
    assert [s.action for s in fresh] == ["start", "start"]
    assert (fresh[0].run.train.load, fresh[1].run.train.load, fresh[1].run.train.finetune) == (None, short, True)
    mid = read(SCHEDULE, saved={short: 2})
    assert [s.action for s in mid] == ["resume", "start"] and mid[0].run.train.load == short
    assert not mid[0].run.train.finetune
    late = read(SCHEDULE, saved={short: 4, long: 1})
    assert [s.action for s in late] == ["skip", "resume"] and late[1].run.train.load == long
    assert [s.action for s in read(SCHEDULE, saved={short: 4, long: 3})] == ["skip", "skip"]
    # A later stage's checkpoints from before its predecessor changed are refused, not mixed in.
    with pytest.raises(ConfigError, match=r"stage 2/2 long: .* holds checkpoints \(step 1\) but stage 1/2 short"):
        read(SCHEDULE, saved={short: 2, long: 1})


def test_seed_coder_schedule_is_the_papers(tmp_path, monkeypatch):
    """The 8B schedule validates (data files stand in as empty files) with the paper's numbers."""
    monkeypatch.chdir(tmp_path)
    spec = yaml.safe_load((ROOT / "examples" / "seed_coder_schedule.yaml").read_text())
    for stage in spec["stages"]:
        for prefix in stage["overrides"]["data.blend"][1::2]:
            for suffix in (".bin", ".idx"):
                (tmp_path / (prefix + suffix)).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / (prefix + suffix)).touch()
    pre, cont = read(ROOT / "examples" / "seed_coder_schedule.yaml", world_size=64)
    tokens = [s.run.train.steps * s.run.train.global_batch_size * s.run.data.seq_length for s in (pre, cont)]
    assert [round(t / 1e12, 3) for t in tokens] == [5.0, 1.0]  # 1T + 4T at 8K, 400B + 600B at 32K
    assert (pre.run.data.seq_length, cont.run.data.seq_length) == (8192, 32768)
    assert (pre.run.optimizer.lr, pre.run.optimizer.min_lr) == (3e-4, pytest.approx(3e-4 / 10 ** 0.5, rel=1e-4))
    assert (cont.run.optimizer.lr, cont.run.optimizer.min_lr) == (pre.run.optimizer.min_lr, 3e-5)
    assert cont.load_optimizer and cont.run.train.finetune_load_optimizer
