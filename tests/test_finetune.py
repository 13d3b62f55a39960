"""Fine-tuning from a checkpoint (``train.finetune``, as Megatron-LM's ``--finetune``): weights
loaded, step / data position / LR schedule from zero, optimizer state only on request; and a
checkpoint that has already run ``train.steps`` stops at start-up instead of training nothing."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import run_pretrain

from megatron_seed.checkpoint.checkpointer import read_train_state
from megatron_seed.checkpoint.layout import latest_checkpoint

COMMON = ("train.precision=fp32", "optimizer.lr=3e-3", "optimizer.warmup_steps=2")


def records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    run_pretrain(d / "pre", *COMMON, "train.steps=3", f"train.save={d / 'ckpt'}")
    return d


def test_loading_a_finished_run_without_finetune_stops_naming_the_key(pretrained):
    proc = run_pretrain(pretrained / "again", *COMMON, "train.steps=3", f"train.load={pretrained / 'ckpt'}",
                        check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train.finetune=true" in proc.stderr and "already run 3 steps" in proc.stderr, proc.stderr[-3000:]
    assert not (pretrained / "again" / "metrics.jsonl").exists()  # stopped before any step


def fresh_forward_loss(ckpt: Path, overrides: tuple) -> float:
    """The masked LM loss of the checkpoint's weights on the run's first global batch, from a
    model loaded in this process (not the trainer)."""
    from megatron_seed.checkpoint.reader import load_megatron_model
    from megatron_seed.config import load_config
    from megatron_seed.data.tokenizer import load_tokenizer
    from megatron_seed.platform.distributed import single_process
    from megatron_seed.training.objectives.pretrain import build_pretrain_objective

    run = load_config(None, [*overrides, "train.micro_batch_size=4", "train.global_batch_size=4"], preset="tiny")
    ctx = SimpleNamespace(dp_rank=0, dp=1, device=torch.device("cpu"))
    batch = next(build_pretrain_objective(run, ctx, load_tokenizer(run.data.tokenizer)).data_iterator(0, 0))
    with single_process(), torch.no_grad():
        gpt = load_megatron_model(str(ckpt))
        per_token = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].double()
    return float((per_token.double() * mask).sum() / mask.sum())


def test_finetune_starts_at_step_zero_from_the_weights_and_resumes_exactly(pretrained):
    d, ckpt = pretrained, pretrained / "ckpt"
    ft_opts = (*COMMON, "train.steps=2", f"train.save={d / 'ft_ckpt'}", "train.save_interval=1")
    run_pretrain(d / "ft", *ft_opts, f"train.load={ckpt}", "train.finetune=true")
    pre, ft = records(d / "pre"), records(d / "ft")
    assert sorted(ft) == [1, 2]  # from step 0, not from the checkpoint's step 3
    # Step 1's loss is the loaded weights' loss on the first batch of the data (position 0).
    want = fresh_forward_loss(ckpt, (*COMMON, "train.steps=2"))
    assert abs(ft[1]["loss"] - want) <= 1e-5, (ft[1]["loss"], want)
    assert ft[1]["loss"] < pre[1]["loss"] - 0.05  # trained weights, not a fresh initialisation
    # The LR schedule starts again: warmup from its start, as in the pretraining run's first steps.
    assert [ft[s]["lr"] for s in (1, 2)] == [pre[s]["lr"] for s in (1, 2)]
    assert ft[1]["lr"] != pre[3]["lr"]
    found, state = read_train_state(str(d / "ft_ckpt"))
    assert found == latest_checkpoint(str(d / "ft_ckpt")) and found.endswith("iter_0000002")
    assert (state.step, state.consumed_samples, state.objective["name"]) == (2, 8, "pretrain")

    # (c) the fine-tuning run's own checkpoints resume exactly, like pretraining's.
    run_pretrain(d / "ft_resumed", *COMMON, "train.steps=2", f"train.load={d / 'ft_ckpt'}/iter_0000001")
    resumed = records(d / "ft_resumed")
    assert sorted(resumed) == [2]
    assert (resumed[2]["loss"], resumed[2]["lr"]) == (ft[2]["loss"], ft[2]["lr"])


def test_finetune_loads_the_optimizer_only_when_asked(pretrained):
    # No warmup: step 1 trains at full LR, so Adam's moments (loaded or fresh) show in step 2.
    opts = (*COMMON, "optimizer.warmup_steps=0", "train.steps=2", f"train.load={pretrained / 'ckpt'}",
            "train.finetune=true")
    run_pretrain(pretrained / "ft_fresh_opt", *opts)
    run_pretrain(pretrained / "ft_loaded_opt", *opts, "train.finetune_load_optimizer=true")
    fresh, loaded = records(pretrained / "ft_fresh_opt"), records(pretrained / "ft_loaded_opt")
    assert fresh[1]["loss"] == loaded[1]["loss"]  # same weights
    # The schedule restarts either way (the loaded param groups' LR is not kept).
    assert fresh[1]["lr"] == loaded[1]["lr"] == 3e-3
    assert abs(fresh[2]["loss"] - loaded[2]["loss"]) > 1e-4  # different Adam state, different update


def test_bf16_finetune_steps_from_the_loaded_weights_not_the_fresh_init(pretrained):
    """bf16 keeps fp32 main params in the optimizer; loaded without the optimizer they must be
    refreshed from the loaded weights. With lr 0 a step leaves the weights as loaded (rounded to
    bf16); a stale copy would put the fresh initialisation (another seed here) back instead."""
    from megatron_seed.checkpoint.reader import load_megatron_model
    from megatron_seed.platform.distributed import single_process

    ckpt, out = pretrained / "ckpt", pretrained / "ft_bf16_ckpt"
    run_pretrain(pretrained / "ft_bf16", "train.precision=bf16", "optimizer.lr=0", "optimizer.min_lr=0",
                 "train.steps=1", "train.seed=7", f"train.load={ckpt}", "train.finetune=true", f"train.save={out}")
    with single_process():
        before = dict(load_megatron_model(str(ckpt)).named_parameters())
        after = dict(load_megatron_model(str(out)).named_parameters())
    assert sorted(before) == sorted(after)
    for name, want in before.items():
        assert torch.equal(after[name].detach().float(), want.detach().to(torch.bfloat16).float()), name


def test_finetune_keys_are_validated_and_another_objective_needs_finetune():
    from megatron_seed.checkpoint.checkpointer import TrainState
    from megatron_seed.config import ConfigError, load_config
    from megatron_seed.training.build import check_checkpoint_objective

    with pytest.raises(ConfigError, match="train.finetune=true needs train.load"):
        load_config(None, ["train.finetune=true"], preset="tiny").validate(1)
    with pytest.raises(ConfigError, match="train.finetune_load_optimizer=true needs train.finetune=true"):
        load_config(None, ["train.load=/x", "train.finetune_load_optimizer=true"], preset="tiny").validate(1)
    saved = TrainState(step=5, objective={"name": "pretrain", "state": {}})
    with pytest.raises(ConfigError, match="written by objective 'pretrain', this run trains 'sft': set train.finetune"):
        check_checkpoint_objective("/x", saved, "sft")
    check_checkpoint_objective("/x", saved, "pretrain")  # resuming the same objective
    check_checkpoint_objective("/x", TrainState(step=5), "sft")  # checkpoints from before objectives were recorded
