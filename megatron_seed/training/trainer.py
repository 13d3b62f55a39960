"""The generic training loop: steps, logging, checkpoints, evaluation, callbacks.

Objectives (pretraining, SFT, DPO, RL) differ only in the :class:`~megatron_seed.training.objective.
Objective` passed in: where micro-batches come from, what a micro-batch's loss is, which metrics it
reports, its checkpointed state and an optional before-step hook. Everything else (megatron-core's
pipeline schedules, gradient reduction, the optimizer step, LR schedule, checkpoints, metrics)
lives here once.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_seed.config.schema import RunConfig
from megatron_seed.training import metrics
from megatron_seed.checkpoint.checkpointer import Checkpointer, TrainState
from megatron_seed.training.forward_only import forward_only
from megatron_seed.training.objective import TOKENS, Objective, check_objective


@dataclass
class StepResult:
    metrics: dict[str, float]  # every metric the objective reports, globally reduced
    loss: float  # metrics[objective.loss_key]
    tokens: float  # real tokens in the global batch
    grad_norm: Optional[float]
    lr: float


class Trainer:
    def __init__(self, run: RunConfig, ctx, chunks: list, optimizer, scheduler, objective: Objective,
                 checkpointer: Checkpointer, logger: metrics.RunLogger,
                 callbacks: tuple[Callable[[dict], None], ...] = ()):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.run, self.ctx, self.chunks = run, ctx, chunks
        self.optimizer, self.scheduler, self.objective = optimizer, scheduler, check_objective(objective)
        self.checkpointer, self.logger, self.callbacks = checkpointer, logger, callbacks
        self.state = TrainState()
        t = run.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * ctx.dp)
        self.forward_backward = get_forward_backward_func()
        config = chunks[0].config
        # DDP fixes its gradient scaling (mean or sum over data-parallel ranks) when it wraps the
        # model, so the flag must already be set then (build_trainer does it).
        if config.calculate_per_token_loss != (objective.loss_normalization == "per_token"):
            raise ValueError(f"objective {objective.name!r} wants {objective.loss_normalization} loss "
                             "normalization but the model was wrapped with calculate_per_token_loss="
                             f"{config.calculate_per_token_loss}; set it before wrapping (see build_trainer)")
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        no_sync = [c.no_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.metric_keys = tuple(objective.metric_keys)
        clash = (set(self.metric_keys) - {objective.loss_key}) & set(metrics.RECORD_KEYS)
        if clash:
            raise ValueError(f"objective {objective.name!r} reports {sorted(clash)}, names the run log "
                             "uses for its own fields; rename them")
        self.flops_per_token = metrics.flops_per_token(run.model, run.data.seq_length)
        self.peak_tflops = metrics.device_peak_tflops(t.precision) if ctx.is_main else None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ steps
    def _iterators(self, split: int, consumed: int):
        its = [self.objective.data_iterator(split, consumed) for _ in self.chunks]
        if self.ctx.cp > 1:  # every rank of a context-parallel group keeps its part of each sequence
            from megatron_seed.models.context_parallel import context_parallel_batches

            its = [None if it is None else context_parallel_batches(it, self.ctx.cp_rank, self.ctx.cp) for it in its]
        return its[0] if len(its) == 1 else its

    def _forward_step(self, data_iterator, model):
        output, loss_func = self.objective.forward_step(data_iterator, model)
        if self.ctx.cp == 1:
            return output, loss_func
        return output, functools.partial(_context_parallel_loss, loss_func,
                                         self.objective.loss_normalization == "per_token")

    def forward_backward_step(self, iterators) -> list[dict]:
        """One global batch's forward and backward passes into zeroed gradients, no update: the
        micro-batches' reports. (Apart from the update so that the memory planner can measure the
        passes alone: megatron_seed.planning.measure.)"""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=iterators, model=self.chunks,
            num_microbatches=self.num_microbatches, seq_length=self.run.data.seq_length,
            micro_batch_size=self.run.train.micro_batch_size, forward_only=False,
        )

    def _reduce(self, reports: list[dict]) -> tuple[dict[str, float], float]:
        """Every reported metric's (sum, count) added over micro-batches, pipeline stages (only
        the last one has reports) and data- and context-parallel ranks, in float64: the global batch's
        weighted means, and its real tokens. One all-reduce per group for all metrics."""
        from megatron.core import parallel_state

        keys = (*self.metric_keys, TOKENS)
        total = torch.zeros(len(keys), 2, dtype=torch.float64)
        for report in reports:
            unknown = set(report) - set(keys)
            if unknown:
                raise ValueError(f"objective {self.objective.name!r} reported {sorted(unknown)}, which are "
                                 f"not in its metric_keys {self.metric_keys}: they would not be reduced")
            if TOKENS not in report or self.objective.loss_key not in report:
                raise ValueError(f"objective {self.objective.name!r}: every report needs {TOKENS!r} (real "
                                 f"tokens, sequences) and its loss {self.objective.loss_key!r}; got {sorted(report)}")
            for i, key in enumerate(keys):
                if key in report:
                    value = report[key].detach()
                    if value.numel() != 2:
                        raise ValueError(f"objective {self.objective.name!r}: report[{key!r}] must be a "
                                         f"(sum, count) pair, got shape {tuple(value.shape)}")
                    total[i] += value.reshape(2).to(torch.float64).cpu()
        total = total.to(self.ctx.device)
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        total = total.cpu()
        sums = set(getattr(self.objective, "sum_keys", ()))
        means = {key: float(total[i, 0]) if key in sums else
                 (float(total[i, 0] / total[i, 1]) if total[i, 1] > 0 else float("nan"))
                 for i, key in enumerate(self.metric_keys)}
        return means, float(total[-1, 0])

    def train_step(self, iterators) -> StepResult:
        lr = self.optimizer.param_groups[0]["lr"]
        reports = self.forward_backward_step(iterators)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        means, tokens = self._reduce(reports)
        return StepResult(means, means[self.objective.loss_key], tokens, grad_norm, lr)

    def skipped_step(self) -> StepResult:
        nan = float("nan")
        return StepResult({k: nan for k in self.metric_keys}, nan, 0.0, None, self.optimizer.param_groups[0]["lr"])

    def evaluate(self, steps: int) -> Optional[dict[str, float]]:
        """The objective's metrics over ``steps`` global batches of the validation split (None
        without one), from forward-only passes."""
        iterators = self._iterators(1, 0)
        if iterators is None or (isinstance(iterators, list) and iterators[0] is None):
            return None
        reports = []
        for _ in range(steps):
            reports.extend(forward_only(self.run, self.chunks, self._forward_step, iterators, self.num_microbatches))
        return self._reduce(reports)[0]

    def save(self) -> None:
        self.state.objective = {"name": self.objective.name, "state": self.objective.state_dict()}
        path = self.checkpointer.save(self.chunks, self.optimizer, self.scheduler, self.state)
        self.logger.info(f"saved checkpoint {path}")

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        t = self.run.train
        iterators = self._iterators(0, self.state.consumed_samples)
        for chunk in self.chunks:
            chunk.train()
        window_start, window_tokens = time.perf_counter(), 0.0
        while self.state.step < t.steps:
            # An objective may find nothing to train on for a step (RL: every group dropped): the
            # step is counted and logged, without a forward, backward or optimizer update.
            update = self.objective.before_step(self.state.step) is not False
            result = self.train_step(iterators) if update else self.skipped_step()
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            window_tokens += result.tokens
            if update and not math.isfinite(result.loss):
                raise FloatingPointError(f"loss is {result.loss} at step {self.state.step}; lower "
                                         "optimizer.lr or check the data")
            if self.state.step % t.log_interval == 0 or self.state.step == t.steps:
                elapsed = time.perf_counter() - window_start
                extra = {k: v for k, v in result.metrics.items() if k != self.objective.loss_key}
                extra.update(self.objective.step_metrics())
                record = metrics.step_record(
                    self.state.step, result.loss, result.lr, result.grad_norm,
                    window_tokens, elapsed, self.flops_per_token, self.ctx.world_size, self.peak_tflops,
                    extra=extra)
                self.history.append(record)
                self.logger.log(record)
                for callback in self.callbacks:
                    callback(record)
                window_start, window_tokens = time.perf_counter(), 0.0
            if t.eval_interval and self.state.step % t.eval_interval == 0:
                val = self.evaluate(t.eval_steps)
                if val is not None:
                    self.logger.info(f"step {self.state.step}: validation loss {val[self.objective.loss_key]:.4f}"
                                     + "".join(f" | {k} {v:.4f}" for k, v in val.items()
                                               if k != self.objective.loss_key))
            if t.save and t.save_interval and self.state.step % t.save_interval == 0:
                self.save()
                window_start = time.perf_counter()  # keep save time out of throughput
        if t.save and (not t.save_interval or self.state.step % t.save_interval != 0):
            self.save()
        self.checkpointer.close()
        self.objective.close()
        return self.history


def _context_parallel_loss(loss_func, per_token: bool, output):
    """An objective's loss over this rank's part of the sequences, made right for the whole ones.

    Per token, megatron-core already sums the loss-token counts over data- and context-parallel
    ranks. Per micro-batch it divides each rank's loss sum by the count it is given and DDP then
    averages gradients over DP x CP ranks: so the count becomes the whole sequences' (summed over
    the context-parallel group) and the sum is scaled by the group's size, which makes the
    gradient exactly that of (sum over the sequences / their loss tokens), as with one rank."""
    from megatron.core import parallel_state

    loss_sum, num_tokens, report = loss_func(output)
    if per_token:
        return loss_sum, num_tokens, report
    group = parallel_state.get_context_parallel_group()
    total = num_tokens.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return loss_sum * group.size(), total, report
