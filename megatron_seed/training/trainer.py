"""The generic training loop: steps, logging, checkpoints, evaluation, callbacks.

Objectives (pretraining, SFT, DPO, RL) differ only in the object passed as ``objective``: where
micro-batches come from (``data_iterator``) and what a micro-batch's loss is (``forward_step``).
Everything else (megatron-core's pipeline schedules, gradient reduction, the optimizer step,
LR schedule, checkpoints, metrics) lives here once.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from megatron_seed.config.schema import RunConfig
from megatron_seed.training import metrics
from megatron_seed.training.checkpointing import Checkpointer, TrainState


class Trainer:
    def __init__(self, run: RunConfig, ctx, chunks: list, optimizer, scheduler, objective,
                 checkpointer: Checkpointer, logger: metrics.RunLogger,
                 callbacks: tuple[Callable[[dict], None], ...] = ()):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.run, self.ctx, self.chunks = run, ctx, chunks
        self.optimizer, self.scheduler, self.objective = optimizer, scheduler, objective
        self.checkpointer, self.logger, self.callbacks = checkpointer, logger, callbacks
        self.state = TrainState()
        t = run.train
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * ctx.dp)
        self.forward_backward = get_forward_backward_func()
        config = chunks[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        no_sync = [c.no_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.flops_per_token = metrics.flops_per_token(run.model, run.data.seq_length)
        self.peak_tflops = metrics.device_peak_tflops(t.precision) if ctx.is_main else None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ steps
    def _iterators(self, split: int, consumed: int):
        its = [self.objective.data_iterator(split, consumed) for _ in self.chunks]
        return its[0] if len(its) == 1 else its

    def _run_microbatches(self, iterators, forward_only: bool) -> list[dict]:
        return self.forward_backward(
            forward_step_func=self.objective.forward_step, data_iterator=iterators, model=self.chunks,
            num_microbatches=self.num_microbatches, seq_length=self.run.data.seq_length,
            micro_batch_size=self.run.train.micro_batch_size, forward_only=forward_only,
        )

    def _reduce_loss(self, losses: list[dict], key: str = "lm loss") -> float:
        """Token-weighted mean over micro-batches, data-parallel ranks and pipeline stages."""
        from megatron.core import parallel_state

        total = torch.zeros(2, dtype=torch.float64)
        for item in losses:
            total += item[key].to(torch.float64).cpu()
        device = self.ctx.device
        total = total.to(device)
        torch.distributed.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    def train_step(self, iterators) -> tuple[float, Optional[float], float]:
        lr = self.optimizer.param_groups[0]["lr"]
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run_microbatches(iterators, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return self._reduce_loss(losses), grad_norm, lr

    @torch.no_grad()
    def evaluate(self, steps: int) -> Optional[float]:
        iterators = self._iterators(1, 0)
        if iterators is None or (isinstance(iterators, list) and iterators[0] is None):
            return None
        for chunk in self.chunks:
            chunk.eval()
        losses = []
        for _ in range(steps):
            losses.extend(self._run_microbatches(iterators, forward_only=True))
        for chunk in self.chunks:
            chunk.train()
        return self._reduce_loss(losses)

    # ------------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        t = self.run.train
        tokens_per_step = t.global_batch_size * self.run.data.seq_length
        iterators = self._iterators(0, self.state.consumed_samples)
        for chunk in self.chunks:
            chunk.train()
        window_start, window_tokens = time.perf_counter(), 0
        while self.state.step < t.steps:
            loss, grad_norm, lr = self.train_step(iterators)
            self.state.step += 1
            self.state.consumed_samples += t.global_batch_size
            window_tokens += tokens_per_step
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.state.step}; lower "
                                         "optimizer.lr or check the data")
            if self.state.step % t.log_interval == 0 or self.state.step == t.steps:
                elapsed = time.perf_counter() - window_start
                record = metrics.step_record(
                    self.state.step, loss, lr, grad_norm,
                    window_tokens, elapsed, self.flops_per_token, self.ctx.world_size, self.peak_tflops)
                self.history.append(record)
                self.logger.log(record)
                for callback in self.callbacks:
                    callback(record)
                window_start, window_tokens = time.perf_counter(), 0
            if t.eval_interval and self.state.step % t.eval_interval == 0:
                val = self.evaluate(t.eval_steps)
                if val is not None:
                    self.logger.info(f"step {self.state.step}: validation loss {val:.4f}")
            if t.save and t.save_interval and self.state.step % t.save_interval == 0:
                path = self.checkpointer.save(self.chunks, self.optimizer, self.scheduler, self.state)
                self.logger.info(f"saved checkpoint {path}")
                window_start = time.perf_counter()  # keep save time out of throughput
        if t.save and (not t.save_interval or self.state.step % t.save_interval != 0):
            path = self.checkpointer.save(self.chunks, self.optimizer, self.scheduler, self.state)
            self.logger.info(f"saved checkpoint {path}")
        self.checkpointer.close()
        return self.history
