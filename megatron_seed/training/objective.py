"""The seam between the one training loop (:mod:`megatron_seed.training.trainer`) and an objective.

Pretraining, SFT, DPO and RL differ only in what an :class:`Objective` provides:

* **data**: ``data_iterator(split, consumed_samples)``, this rank's endless micro-batches of one
  split (0 train, 1 validation, 2 test) starting after ``consumed_samples`` samples of the global
  order (None when the split is empty). The loop counts consumed samples (``global_batch_size``
  per step) and checkpoints the number, so a sample-indexed dataset resumes exactly from it alone.
* **forward step**: ``forward_step(data_iterator, model)`` with megatron-core's
  ``forward_step_func`` contract: it returns the model's output tensor and a loss function of that
  output. The loss function returns ``(loss_sum, num_loss_tokens, report)``; megatron-core divides
  the sum by the micro-batch's loss tokens and the number of micro-batches or, with
  ``loss_normalization="per_token"``, by the loss tokens of the whole global batch (see below).
* **metrics**: ``report`` maps every name in ``metric_keys`` (the optimized loss, ``loss_key``,
  among them) to a 2-element tensor ``(sum, count)``. The loop adds the pairs over micro-batches,
  pipeline stages and data-parallel ranks and logs ``sum / count``: a token- (or sample-)
  weighted mean that is the same for any split of the global batch. ``loss_key`` is logged as
  ``loss``, every other key under its own name.
* **tokens**: ``report[TOKENS]`` = ``(real tokens, sequences)`` of the micro-batch, summed over
  the step for tokens/s and MFU; real tokens exclude padding (slots are not tokens).
* **state**: ``state_dict()`` / ``load_state_dict(state)``: what the objective needs besides the
  consumed-sample count to resume exactly (a packer's carry-over, an RL prompt cursor, ...).
  Stored in the checkpoint's common (replicated) part, so it must be the same on every rank.
* **hook**: ``before_step(step)`` runs before each optimizer step (``step`` = steps done so
  far): where RL generates rollouts. Returning ``False`` says the step has nothing to train on:
  the loop counts and logs it without a forward, backward or optimizer update.
* **model**: ``bind_model(chunks)`` hands the objective the wrapped model chunks once they exist
  (and hold the loaded checkpoint): RL copies the policy's weights into its rollout engine.
* **step metrics**: ``step_metrics()`` returns metrics that are not per micro-batch (rollout
  rewards, phase timings), identical on every rank, merged into each logged record.
* **close**: ``close()`` at the end of training releases what the objective started (sandboxes,
  worker threads).
* **needs** (declared on the class, read before anything is built): ``needs``, an
  :class:`ObjectiveNeeds` (whether the run's token data is checked, whether context parallelism can
  split its loss), and ``check_config(run)``, its own checks of the run config. The factory names
  its class with :func:`builds`; ``RunConfig.validate`` asks them through the checks this module
  installs into the config layer (which cannot import training), so a run that does not fit its
  objective fails before any process group starts.

**Loss normalization.** ``"per_token"`` sets megatron-core's ``calculate_per_token_loss``: the
schedule back-propagates the *sum* of masked token losses, and ``finalize_model_grads`` divides
the gradients by the number of loss tokens all-reduced over micro-batches, pipeline stages and
data-parallel ranks. The gradient is then that of (total loss / total loss tokens) of the global
batch, and the logged ``loss`` is exactly the loss optimized, however the batch is split into
micro-batches and ranks. ``"per_microbatch"`` (megatron-core's default) averages each
micro-batch's mean loss over micro-batches and ranks: equal to per-token only when every
micro-batch has the same number of loss tokens (the logged ``loss`` is still the token-weighted
mean, so with uneven masks it is not exactly the loss optimized).

Objectives are built by a factory ``(run, ctx, tokenizer) -> Objective`` (``ctx``:
:class:`megatron_seed.platform.distributed.ParallelContext`, for data-parallel rank, size and
device; ``tokenizer``: the run's, from ``data.tokenizer``). ``train.objective`` names one: a
registered name (``pretrain``; the built-in objectives live in
:mod:`megatron_seed.training.objectives`) or ``package.module:function``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Optional, Protocol, Union,
                    runtime_checkable)

import torch

from megatron_seed.config.schema import ConfigError

if TYPE_CHECKING:
    from megatron_seed.config.schema import RunConfig
    from megatron_seed.platform.distributed import ParallelContext

TOKENS = "tokens"  # reserved report key: (real tokens, sequences) of a micro-batch

LossNormalization = Literal["per_token", "per_microbatch"]
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What an objective needs of a run, declared on its class (``Objective.needs``) and checked by
    ``RunConfig.validate`` before any process group starts."""

    # The run's token data: data.blend (PREFIX.bin/.idx files) or data.mock, checked unless
    # data.train names files of its own (conversations, pairs). False: the objective makes its
    # data itself (RL samples it), so the token data is not checked.
    token_data: bool = True
    # parallel.context > 1 splits every sequence over ranks: a loss that is a sum over tokens splits
    # with it; one that sums log-probabilities per sequence (a pair's, a rollout's) would need a
    # sum across the group first.
    context_parallel: bool = False


@runtime_checkable
class Objective(Protocol):
    """What the training loop needs from an objective. Subclass it to inherit the defaults of the
    optional members (``before_step``, ``state_dict``, ``load_state_dict``)."""

    name: str  # recorded in checkpoints: resuming under another objective needs train.finetune
    loss_key: str  # the metric that is optimized; logged as "loss"
    metric_keys: tuple[str, ...]  # every key the loss function reports (besides TOKENS)
    loss_normalization: LossNormalization
    # Keys logged as the step's total (the sum) instead of sum / count, e.g. loss tokens per step.
    sum_keys: tuple[str, ...] = ()
    # What the objective needs of a run: read from the class its factory builds (see builds), before
    # any instance exists.
    needs: ClassVar[ObjectiveNeeds] = ObjectiveNeeds()

    @classmethod
    def check_config(cls, run: "RunConfig") -> None:
        """The objective's own checks of a run config, after the layout's (``RunConfig.validate``,
        before any process group starts): a ConfigError that names the key to change."""
        return None

    def data_iterator(self, split: int, consumed_samples: int) -> Optional[Iterator[Any]]:
        """This rank's micro-batches of ``split`` from global sample ``consumed_samples`` on."""
        raise NotImplementedError

    def forward_step(self, data_iterator: Iterator[Any], model: torch.nn.Module) -> tuple[torch.Tensor, LossFunc]:
        """megatron-core's forward_step_func: (output tensor, loss function of it)."""
        raise NotImplementedError

    def before_step(self, step: int) -> Optional[bool]:
        """Called before every optimizer step; ``step`` = steps completed so far. ``False``: no
        update this step (nothing to train on)."""
        return None

    def bind_model(self, chunks: list) -> None:
        """The wrapped model chunks, after the checkpoint (if any) is loaded."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Metrics since the last call that are not reported per micro-batch (same on all ranks)."""
        return {}

    def close(self) -> None:
        """Release what the objective started."""
        return None

    def state_dict(self) -> dict:
        """Objective state to checkpoint (identical on all ranks)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        return None


ObjectiveFactory = Callable[["RunConfig", "ParallelContext", Any], Objective]  # (run, ctx, tokenizer)

# Registered objectives: name -> factory, or "module:function" imported on first use (importing
# an objective's module pulls in its data code, which other objectives do not need).
OBJECTIVES: dict[str, Union[str, ObjectiveFactory]] = {
    "pretrain": "megatron_seed.training.objectives.pretrain:build_pretrain_objective",
    "sft": "megatron_seed.training.objectives.sft:build_sft_objective",
    "dpo": "megatron_seed.training.objectives.dpo:build_dpo_objective",
    "rl": "megatron_seed.training.objectives.rl:build_rl_objective",
}


def builds(objective_class: type) -> Callable[[ObjectiveFactory], ObjectiveFactory]:
    """Decorate a factory with the Objective class it builds, whose ``needs`` and ``check_config``
    a run is validated against before the factory runs. A factory without it gets the defaults of
    :class:`Objective` (token data checked, no context parallelism, no checks of its own)."""

    def mark(factory: ObjectiveFactory) -> ObjectiveFactory:
        factory.objective_class = objective_class
        return factory

    return mark


def declared_objective(spec: str) -> type:
    """The Objective class whose declarations ``train.objective=spec`` runs under."""
    return getattr(resolve_objective(spec), "objective_class", Objective)


def resolve_objective(spec: str) -> ObjectiveFactory:
    """The factory that ``train.objective`` names: a registered name or ``package.module:function``."""
    target = OBJECTIVES.get(spec, spec)
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ConfigError(f"train.objective={spec!r} is neither a registered objective "
                          f"({', '.join(sorted(OBJECTIVES))}) nor a 'package.module:function' path")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"train.objective={spec!r}: cannot import {target} ({err})") from err
    if not callable(factory):
        raise ConfigError(f"train.objective={spec!r}: {target} is not callable")
    return factory


# What the loop uses of an objective instance: every member of Objective but the class-level
# declarations (needs, check_config), which are read from the class before any instance exists.
_INSTANCE_MEMBERS = ("name", "loss_key", "metric_keys", "loss_normalization", "sum_keys", "data_iterator",
                     "forward_step", "before_step", "bind_model", "step_metrics", "close", "state_dict",
                     "load_state_dict")


def check_objective(objective: Any) -> Objective:
    """Fail at start-up, naming what is missing, rather than inside megatron-core's schedule."""
    missing = [m for m in _INSTANCE_MEMBERS if not hasattr(objective, m)]
    if missing:
        raise TypeError(f"{type(objective).__name__} is not an Objective: it lacks {', '.join(missing)} "
                        "(subclass megatron_seed.training.objective.Objective)")
    if objective.loss_normalization not in ("per_token", "per_microbatch"):
        raise ValueError(f"objective {objective.name!r}: loss_normalization must be 'per_token' or "
                         f"'per_microbatch', got {objective.loss_normalization!r}")
    keys = tuple(objective.metric_keys)
    if objective.loss_key not in keys or TOKENS in keys or len(set(keys)) != len(keys):
        raise ValueError(f"objective {objective.name!r}: metric_keys {keys} must list loss_key "
                         f"{objective.loss_key!r} once each and not the reserved {TOKENS!r}")
    return objective


class _ConfigChecks:
    """``RunConfig.validate``'s questions about the objective ``train.objective`` names (the
    config layer's ObjectiveChecks), answered from the objective's declarations."""

    def uses_token_data(self, run: "RunConfig") -> bool:
        return declared_objective(run.train.objective).needs.token_data

    def check_context_parallel(self, run: "RunConfig") -> None:
        if declared_objective(run.train.objective).needs.context_parallel:
            return
        able = [name for name in OBJECTIVES if declared_objective(name).needs.context_parallel]
        raise ConfigError(f"parallel.context={run.parallel.context} supports train.objective="
                          f"{', '.join(able[:-1])}{' and ' if len(able) > 1 else ''}{able[-1]} (got "
                          f"{run.train.objective!r}: its loss sums log-probabilities per sequence); set "
                          "parallel.context=1")

    def check(self, run: "RunConfig") -> None:
        declared_objective(run.train.objective).check_config(run)


# The config sits below training and cannot look objectives up itself: whoever validates a run for
# training passes these to RunConfig.validate (stateless: one shared instance).
CONFIG_CHECKS = _ConfigChecks()
