"""Exact resume, resharding on load, and atomic publication of checkpoints."""

import os

from helpers import assert_losses_close, losses, run_pretrain

from megatron_seed.checkpoint.layout import latest_checkpoint

COMMON = ("train.steps=6", "train.precision=fp32")


def test_resume_is_exact_single_process(tmp_path):
    full, part, resumed, ckpt = (tmp_path / n for n in ("full", "part", "resumed", "ckpt"))
    run_pretrain(full, *COMMON)
    run_pretrain(part, *COMMON, f"train.save={ckpt}", "train.save_interval=3")
    assert sorted(os.listdir(ckpt)) == ["iter_0000003", "iter_0000006", "latest", "model_config.json", "tokenizer"]
    run_pretrain(resumed, *COMMON, f"train.load={ckpt}/iter_0000003")
    want = losses(full)
    assert_losses_close(losses(part), want, atol=0.0)
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    assert_losses_close(got, {s: want[s] for s in (4, 5, 6)}, atol=0.0)

    # train.save_optimizer=false: weights only, a fraction of the bytes; a load restarts Adam
    # and the LR schedule but step 4 (computed before any update) sees the same weights and data
    slim, slim_run, from_slim = tmp_path / "slim", tmp_path / "slim_run", tmp_path / "from_slim"
    run_pretrain(slim_run, *COMMON, f"train.save={slim}", "train.save_interval=3", "train.save_optimizer=false")
    assert _bytes(slim / "iter_0000003") < 0.5 * _bytes(ckpt / "iter_0000003")
    proc = run_pretrain(from_slim, *COMMON, f"train.load={slim}/iter_0000003")
    assert "holds no optimizer state" in proc.stdout + proc.stderr
    assert losses(from_slim)[4] == want[4]


def _bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_resume_is_exact_with_distributed_optimizer(tmp_path):
    full, resumed, ckpt = (tmp_path / n for n in ("full", "resumed", "ckpt"))
    opts = (*COMMON, "parallel.distributed_optimizer=true")
    run_pretrain(full, *opts, f"train.save={ckpt}", "train.save_interval=3", nproc=2)
    run_pretrain(resumed, *opts, f"train.load={ckpt}/iter_0000003", nproc=2)
    want = losses(full)
    assert_losses_close(losses(resumed), {s: want[s] for s in (4, 5, 6)}, atol=0.0)


def test_tp2_checkpoint_loads_at_tp1(tmp_path):
    tp2, tp1, ckpt = (tmp_path / n for n in ("tp2", "tp1", "ckpt"))
    run_pretrain(tp2, *COMMON, "parallel.tensor=2", f"train.save={ckpt}", "train.save_interval=3", nproc=2)
    proc = run_pretrain(tp1, *COMMON, f"train.load={ckpt}/iter_0000003")
    assert "loading the model only" in proc.stderr + proc.stdout
    # step 4's loss is computed with the loaded weights before any update: same model, same loss
    assert abs(losses(tp1)[4] - losses(tp2)[4]) < 1e-5


def test_partial_and_corrupt_saves_are_never_loaded(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_pretrain(tmp_path / "run", "train.steps=2", f"train.save={ckpt}", "train.save_interval=1")
    assert latest_checkpoint(str(ckpt)).endswith("iter_0000002")
    # a save killed mid-way: its .partial directory exists, `latest` still names the old one
    (ckpt / "iter_0000003.partial").mkdir()
    (ckpt / "iter_0000003.partial" / "metadata.json").write_text("{}")
    assert latest_checkpoint(str(ckpt)).endswith("iter_0000002")
    # `latest` pointing at a directory without metadata falls back to the newest complete one
    (ckpt / "latest").write_text("iter_0000009\n")
    assert latest_checkpoint(str(ckpt)).endswith("iter_0000002")
    assert latest_checkpoint(str(tmp_path / "nothing")) is None


def test_async_save_publishes_and_resumes_exactly(tmp_path):
    full, resumed, ckpt = (tmp_path / n for n in ("full", "resumed", "ckpt"))
    opts = ("train.steps=4", "train.precision=fp32")
    run_pretrain(full, *opts, f"train.save={ckpt}", "train.save_interval=2", "train.async_save=true")
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest", "model_config.json", "tokenizer"]
    run_pretrain(resumed, *opts, f"train.load={ckpt}/iter_0000002")
    want = losses(full)
    assert_losses_close(losses(resumed), {3: want[3], 4: want[4]}, atol=0.0)
