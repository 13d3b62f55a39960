"""The objective seam: per-token loss normalization that is exact across any split of the global
batch, every reported metric reduced to its global weighted mean, objective state and the
before-step hook through a checkpoint, and start-up errors for objectives that do not fit.

The objective under test is pretraining with an uneven loss mask: each sample loses a prefix of
its loss tokens whose length comes from the sample's own tokens (so it does not depend on which
rank or micro-batch holds the sample), giving every micro-batch a different loss-token count.
The runs select it with ``train.objective=test_objective_seam:<factory>``. Layouts: one
micro-batch of 4 (the reference), 4 micro-batches of 1, DP=2 and PP=2 (2 micro-batches each).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import ROOT, pretrain_cmd, run_cli, subprocess_env

from megatron_seed.training.objective import Objective
from megatron_seed.training.objectives.pretrain import PretrainObjective, build_pretrain_objective, lm_loss

STEPS = 3
COMMON = (f"train.steps={STEPS}", "train.precision=fp32", "train.global_batch_size=4", "optimizer.lr=3e-3")


def uneven_mask(batch: dict) -> torch.Tensor:
    """The dataset's loss mask with the first k tokens of each sample zeroed, k in [0, seq/2)."""
    tokens, mask = batch["tokens"], batch["loss_mask"].clone()
    for i in range(tokens.shape[0]):
        mask[i, : int(tokens[i].sum()) % (tokens.shape[1] // 2)] = 0
    return mask


def loss_with_fraction(mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_sum, num_tokens, report = lm_loss(mask, per_token_loss)
    # A second metric whose global mean the test computes from the data alone.
    report["loss_token_fraction"] = torch.stack([mask.sum().double(), torch.tensor(mask.numel(), dtype=torch.float64)])
    return loss_sum, num_tokens, report


class UnevenMaskObjective(PretrainObjective):
    name = "pretrain_uneven_mask"
    metric_keys = ("lm loss", "loss_token_fraction")

    def __init__(self, base: PretrainObjective, loss_normalization: str):
        super().__init__(base.datasets, base.micro_batch_size, base.dp_rank, base.dp_size, base.device)
        self.loss_normalization = loss_normalization
        self.steps_seen = 0  # checkpointed: a resumed run must continue the count

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_with_fraction, uneven_mask(batch))

    def before_step(self, step: int) -> None:
        if step != self.steps_seen:
            raise RuntimeError(f"before_step({step}) after {self.steps_seen} calls: objective state not restored")
        self.steps_seen += 1

    def state_dict(self) -> dict:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict) -> None:
        self.steps_seen = state["steps_seen"]


def uneven_per_token(run, ctx, tokenizer):
    return UnevenMaskObjective(build_pretrain_objective(run, ctx, tokenizer), "per_token")


def uneven_per_microbatch(run, ctx, tokenizer):
    return UnevenMaskObjective(build_pretrain_objective(run, ctx, tokenizer), "per_microbatch")


def run_objective(run_dir: Path, factory: str, *overrides: str, nproc: int = 1):
    # The launched processes import this module to find the factory: put tests/ on their path.
    env = dict(subprocess_env(), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = pretrain_cmd(run_dir, *COMMON, f"train.objective=test_objective_seam:{factory}", *overrides, nproc=nproc)
    proc = run_cli(cmd, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("seam")
    return {
        "mbs1": run_objective(d / "mbs1", "uneven_per_token", "train.micro_batch_size=1"),
        "mbs4": run_objective(d / "mbs4", "uneven_per_token", "train.micro_batch_size=4",
                              f"train.save={d / 'ckpt'}", "train.save_interval=2"),
        "dp2": run_objective(d / "dp2", "uneven_per_token", "train.micro_batch_size=1", nproc=2),
        # the loss-token count lives on the last stage only; finalize_model_grads broadcasts it
        "pp2": run_objective(d / "pp2", "uneven_per_token", "train.micro_batch_size=1", "parallel.pipeline=2",
                             nproc=2),
        "mbs1_per_microbatch": run_objective(d / "pmb", "uneven_per_microbatch", "train.micro_batch_size=1"),
        "ckpt": d / "ckpt",
        "dir": d,
    }


def test_per_token_loss_and_grad_norm_do_not_depend_on_the_split(runs):
    want = runs["mbs4"]  # one micro-batch: the global batch's loss in one piece
    for name in ("mbs1", "dp2", "pp2"):
        assert sorted(runs[name]) == list(range(1, STEPS + 1))
        for step in want:
            for key in ("loss", "grad_norm"):
                got, ref = runs[name][step][key], want[step][key]
                assert abs(got - ref) <= 1e-6, f"{name} step {step} {key}: {got} vs {ref}"
    assert want[STEPS]["loss"] < want[1]["loss"]  # it trains: parity of a broken run would be vacuous
    # The masks really are uneven: averaging per micro-batch trains on a different loss.
    pmb = runs["mbs1_per_microbatch"]
    assert pmb[1]["loss"] == pytest.approx(want[1]["loss"], abs=1e-6)  # same weights, same logged mean
    assert abs(pmb[2]["loss"] - want[2]["loss"]) > 1e-4, (pmb[2]["loss"], want[2]["loss"])


def test_every_reported_metric_is_its_exact_global_mean(runs):
    from megatron_seed.config import load_config
    from megatron_seed.data.tokenizer import load_tokenizer

    # The fraction of loss tokens per global batch, from the data: one micro-batch per step.
    run = load_config(None, [*COMMON, "train.micro_batch_size=4"], preset="tiny")
    ctx = SimpleNamespace(dp_rank=0, dp=1, device=torch.device("cpu"))
    batches = uneven_per_token(run, ctx, load_tokenizer(run.data.tokenizer)).data_iterator(0, 0)
    want = {}
    for step in range(1, STEPS + 1):
        mask = uneven_mask(next(batches))
        want[step] = float(mask.sum().double() / mask.numel())
    assert len(set(want.values())) == STEPS  # uneven: a per-micro-batch or per-rank mean would differ
    for name in ("mbs1", "mbs4", "dp2", "pp2"):
        for step in want:
            assert abs(runs[name][step]["loss_token_fraction"] - want[step]) <= 1e-12, (name, step)
    # The run log keeps its own keys, then the objective's.
    assert list(runs["mbs4"][1])[:9] == ["step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s",
                                         "tflops", "mfu", "peak_mem_gib"]


def test_objective_state_and_before_step_resume_exactly(runs):
    # The objective's before_step raises unless its checkpointed count was restored.
    resumed = run_objective(runs["dir"] / "resumed", "uneven_per_token", "train.micro_batch_size=4",
                            f"train.load={runs['ckpt']}/iter_0000002")
    assert sorted(resumed) == [STEPS]
    assert resumed[STEPS]["loss"] == runs["mbs4"][STEPS]["loss"]


def test_objectives_that_do_not_fit_fail_at_start_up_naming_the_problem():
    from megatron_seed.config.schema import ConfigError
    from megatron_seed.training.objective import check_objective, resolve_objective

    assert resolve_objective("pretrain") is build_pretrain_objective
    with pytest.raises(ConfigError, match="train.objective='no_such'"):
        resolve_objective("no_such")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_objective("no_such_module:factory")

    class NoForward:
        name, loss_key, metric_keys, loss_normalization = "x", "lm loss", ("lm loss",), "per_token"

    with pytest.raises(TypeError, match="forward_step"):
        check_objective(NoForward())

    class LossNotListed(Objective):
        name, loss_key, metric_keys, loss_normalization = "y", "lm loss", ("other",), "per_token"

        def data_iterator(self, split, consumed_samples):
            return None

        def forward_step(self, data_iterator, model):
            raise NotImplementedError

    with pytest.raises(ValueError, match="metric_keys"):
        check_objective(LossNotListed())
