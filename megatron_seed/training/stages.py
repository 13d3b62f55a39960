"""Staged training runs: one config file, several runs of the one trainer in sequence, each
starting from the previous stage's final checkpoint. Seed-Coder pretrains at 8K tokens, then
continues at 32K on repository-level data with its own LR schedule (examples/seed_coder_schedule.yaml).

The file lists ``stages:``; everything else in it (with the preset and the command-line
overrides) is the base every stage starts from, and a stage's ``overrides`` go on top::

    preset: tiny
    train: {global_batch_size: 4}
    stages:
      - name: short
        overrides: {train.steps: 4, data.seq_length: 32}
      - name: long
        load_optimizer: false          # default: weights only, Adam state starts fresh
        overrides: {train.steps: 3, data.seq_length: 64, optimizer.lr: 1.0e-3}

Stage ``i`` runs in ``<train.run_dir>/<i>_<name>/`` (its metrics.jsonl and config.json) and saves to
``<train.run_dir>/<i>_<name>/checkpoints``. Stage 1 starts as the base config says (fresh, or from
the base ``train.load``); stage ``i > 1`` starts from the weights of stage ``i - 1``'s final
checkpoint at step 0 (``train.finetune``; ``load_optimizer: true`` adds the optimizer state).

Resuming: the same command again. Where each stage stands is read from its checkpoints at
start-up, before anything trains, so every rank of a multi-process job makes the same plan: a
stage whose checkpoint has reached its ``train.steps`` is skipped, a stage with an earlier
checkpoint resumes from it exactly (a normal ``train.load`` resume), and the stages after it start
as above. Every stage's config is validated first, so a mistake in the last stage stops the job
before the first one trains.

Stages run one after another in this process: the torch process group stays up and
``distributed.initialize`` rebuilds megatron-core's parallel state for each stage (so a stage may
also change ``parallel.tensor``/``pipeline``: checkpoints load at any TP/PP).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional

from megatron_seed.config.loading import apply_settings, config_from_dict, read_config_file
from megatron_seed.config.schema import ConfigError, RunConfig
from megatron_seed.training.objective import CONFIG_CHECKS

STAGE_KEYS = ("name", "overrides", "load_optimizer")
# Where a stage reads and writes its checkpoints is the runner's decision; a stage that set these
# would break the chain that resuming relies on.
RUNNER_KEYS = ("train.run_dir", "train.save", "train.load", "train.finetune", "train.finetune_load_optimizer")
# A stage name becomes a directory name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Fields that fix the shape of the weights (as build.check_checkpoint_model compares them): a
# stage cannot change them and still start from the previous stage's checkpoint.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "tie_embeddings")


@dataclass
class Stage:
    index: int  # 1-based, as logged and as in the directory name
    total: int
    name: str
    run: RunConfig  # this stage's full config; train.load / finetune are set by plan_stages
    load_optimizer: bool = False
    # "start": from the base config (stage 1) or the previous stage's weights; "resume": from its
    # own checkpoint; "skip": its checkpoint has reached train.steps.
    action: Literal["", "start", "resume", "skip"] = ""
    saved_step: int = 0  # the step of its own newest checkpoint (0: none)

    @property
    def label(self) -> str:
        return f"stage {self.index}/{self.total} {self.name}"

    @property
    def save(self) -> str:
        return self.run.train.save or ""


def read_stages(path: Optional[str], overrides: Iterable[str] = (), preset: Optional[str] = None
                ) -> Optional[list[Stage]]:
    """The stages a config file lists, each with its config (base, then its overrides) and its
    directories; ``None`` when the file has no ``stages:`` key (a plain run)."""
    raw = read_config_file(path)
    if "stages" not in raw:
        return None
    items = raw.pop("stages")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"config file {path}: stages must be a non-empty list of "
                          "{name: ..., overrides: {key: value}, load_optimizer: false}")
    base = config_from_dict(raw, overrides, preset)
    if base.train.save:
        raise ConfigError(f"train.save={base.train.save}: a staged run saves each stage to "
                          f"{os.path.join(base.train.run_dir, '<i>_<name>', 'checkpoints')}; leave train.save unset")
    stages, names = [], set()
    for i, item in enumerate(items, start=1):
        where = f"stage {i}/{len(items)}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: each stage must be a mapping with {', '.join(STAGE_KEYS)}, got {item!r}")
        unknown = sorted(set(item) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown stage key(s) {unknown}; a stage has {', '.join(STAGE_KEYS)} "
                              "(config keys go under overrides)")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{where}: name must be a word of letters, digits, '_', '.' or '-' (it names the "
                              f"stage's directory), got {name!r}")
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is used by an earlier stage; stage names must differ")
        names.add(name)
        where = f"stage {i}/{len(items)} {name}"
        settings = item.get("overrides") or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: overrides must be a mapping of config keys to values "
                              f"(e.g. {{train.steps: 100}}), got {settings!r}")
        load_optimizer = item.get("load_optimizer", False)
        if not isinstance(load_optimizer, bool):
            raise ConfigError(f"{where}: load_optimizer must be true or false, got {load_optimizer!r}")
        run = config_from_dict(raw, overrides, preset)  # a fresh copy of the base for this stage
        for key in _flat_keys(settings):
            if key in RUNNER_KEYS:
                raise ConfigError(f"{where}: {key} is set by the stage runner (each stage saves under "
                                  f"<train.run_dir>/<i>_<name>/ and starts from the stage before); remove it")
        try:
            apply_settings(run, settings)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        stage_dir = os.path.join(base.train.run_dir, f"{i}_{name}")
        run.train = dataclasses.replace(run.train, run_dir=stage_dir, save=os.path.join(stage_dir, "checkpoints"))
        stages.append(Stage(i, len(items), name, run, load_optimizer))
    return stages


def _flat_keys(settings: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        keys.extend(_flat_keys(value, dotted + ".") if isinstance(value, dict) else [dotted])
    return keys


def plan_stages(stages: list[Stage], world_size: int,
                saved_step: Optional[Callable[[str], Optional[int]]] = None) -> list[Stage]:
    """Decide from the checkpoints on disk what each stage does (skip, resume, start), point its
    ``train.load`` accordingly and validate every stage's config, naming the stage in any error."""
    saved_step = saved_step or newest_step
    unfinished: Optional[Stage] = None
    for k, stage in enumerate(stages):
        t = stage.run.train
        step = saved_step(stage.save)
        stage.saved_step = step or 0
        if step is not None and unfinished is not None:
            # Its checkpoints were trained from an earlier state of the stage before, which is
            # about to change: continuing from them would mix two runs.
            raise ConfigError(f"{stage.label}: {stage.save} holds checkpoints (step {step}) but "
                              f"{unfinished.label} before it has not finished; delete {stage.save} "
                              f"to run {stage.label} again from {unfinished.label}'s result")
        if step is not None and step >= t.steps:
            stage.action = "skip"
        elif step is not None:
            stage.action = "resume"
            t = dataclasses.replace(t, load=stage.save, finetune=False, finetune_load_optimizer=False)
        else:
            stage.action = "start"
            if k > 0:
                t = dataclasses.replace(t, load=stages[k - 1].save, finetune=True,
                                        finetune_load_optimizer=stage.load_optimizer)
        if stage.action != "skip" and unfinished is None:
            unfinished = stage
        stage.run.train = t
        if k > 0:
            before = stages[k - 1].run.model
            diffs = [f"model.{f}={getattr(stage.run.model, f)}" for f in _SHAPE_FIELDS
                     if getattr(stage.run.model, f) != getattr(before, f)]
            if diffs:
                raise ConfigError(f"{stage.label}: {' '.join(diffs)} differs from {stages[k - 1].label}, whose "
                                  "weights it starts from; a stage may change the RoPE base, data, sequence "
                                  "length and schedule, not the shape of the weights")
        try:
            stage.run.validate(world_size, CONFIG_CHECKS)
        except ConfigError as err:
            raise ConfigError(f"{stage.label}: {err}") from err
    return stages


def newest_step(save_dir: str) -> Optional[int]:
    """The step of the newest complete checkpoint under ``save_dir``; None if there is none."""
    from megatron_seed.checkpoint.checkpointer import read_train_state
    from megatron_seed.checkpoint.layout import latest_checkpoint

    if not os.path.isdir(save_dir) or latest_checkpoint(save_dir) is None:
        return None
    return read_train_state(save_dir)[1].step


def describe(stage: Stage) -> str:
    """One log line: what the stage does and with which settings."""
    run, t = stage.run, stage.run.train
    o = run.optimizer
    what = {
        "skip": f"complete (checkpoint at step {stage.saved_step} of {t.steps}), skipped",
        "resume": f"resuming from {t.load} at step {stage.saved_step} of {t.steps}",
        "start": (f"starting from the weights of {t.load}" + (" and its optimizer state" if t.finetune_load_optimizer
                                                              else "") + f", {t.steps} steps"
                  if t.finetune else f"starting{f' from {t.load}' if t.load else ''}, {t.steps} steps"),
    }[stage.action]
    return (f"{stage.label}: {what} | seq {run.data.seq_length} | lr {o.lr:.3g} -> {o.min_lr_value:.3g} "
            f"({o.schedule}, warmup {o.warmup_steps}) | rotary_base {run.model.rotary_base:g} | {t.run_dir}")


def run_stages(stages: list[Stage], build: Callable[[RunConfig], Any], log: Callable[[str], None]) -> None:
    """Build and fit each planned stage in turn (``build``: a config -> Trainer, e.g.
    build_run). A config error found while building a stage names the stage."""
    import torch

    for stage in stages:
        log(describe(stage))
        if stage.action == "skip":
            continue
        try:
            trainer = build(stage.run)
        except ConfigError as err:
            raise ConfigError(f"{stage.label}: {err}") from err
        trainer.fit()
        trainer.logger.close()
        # Rank 0 publishes the final checkpoint (``latest``); the next stage reads it on every rank.
        torch.distributed.barrier()
        log(f"{stage.label}: finished at step {trainer.state.step}, checkpoint in {stage.save}")


def stderr_on_rank0(rank: int) -> Callable[[str], None]:
    def log(message: str) -> None:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)
    return log
