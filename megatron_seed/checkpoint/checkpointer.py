"""Sharded checkpoints with megatron-core dist_checkpointing, saved atomically.

The directory layout (``iter_N/``, ``latest``, ``iter_N.partial/``) is in ``checkpoint.layout``.
A save writes to ``iter_N.partial``, then after every rank has finished, rank 0 publishes it
(``layout.publish``): renames it to ``iter_N`` and replaces ``latest`` atomically (write-to-temp +
fsync + rename). A process killed at any point leaves either the old ``latest`` or the new one,
each naming a complete directory.

Model shards carry global tensor keys, so a checkpoint loads at another TP/PP than it was saved
with.  RNG states
are sharded per (pp, tp, dp) rank and restored only at the same layout. Optimizer state (and the
LR schedule) is restored when TP, PP and the optimizer kind match the checkpoint (the
distributed optimizer's "dp_reshardable" format also allows another DP size); otherwise only the
model is loaded and a message says so, as Megatron-LM does with ``--no-load-optim``. Fully
reshardable optimizer state needs megatron-core paths that assume CUDA and TE/Apex Adam; it is
not offered on CPU.

Helper processes. Every save (sync or async) goes through megatron-core's FileSystemWriterAsync,
which (a) spawns, once per process, a multiprocessing ``Manager`` server for its results queue
(and with it multiprocessing's resource tracker), and (b) forks one writer process per file, plus
one more process for an async save. None of them watches its parent: a ``kill -9`` of the trainer
left the manager, the tracker and any writer mid-save running forever.
``_bind_save_helpers_to_this_process`` makes each die with the trainer; the resource tracker then
sees EOF on its pipe (its last writers are gone) and exits by itself.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_seed.checkpoint.layout import LATEST, iteration_dir, latest_checkpoint, publish


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    # The objective's name and state_dict() ({"name": ..., "state": ...}); None in checkpoints
    # written before objectives were recorded.
    objective: Optional[dict] = None


def read_train_state(path: str) -> tuple[str, TrainState]:
    """The newest complete checkpoint under ``path`` and its saved TrainState, read from the
    common (rank-0) part alone: cheap, and possible before any process group exists."""
    from megatron.core import dist_checkpointing

    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {path} (looked for {LATEST}, iter_*/metadata.json)")
    common = dist_checkpointing.load_common_state_dict(found)
    return found, _train_state(common)


def _train_state(saved: dict) -> TrainState:
    ts = saved["train_state"]
    return TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]),
                      objective=saved.get("objective"))


def _rng_state(ctx):
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if ctx.cp > 1:  # one state per rank: context-parallel ranks draw their own dropout masks
        return ShardedObject("rng_state", state, (ctx.pp, ctx.tp, ctx.dp, ctx.cp),
                             (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank, ctx.cp_rank), replica_id=0)
    return ShardedObject("rng_state", state, (ctx.pp, ctx.tp, ctx.dp), (ctx.pp_rank, ctx.tp_rank, ctx.dp_rank),
                         replica_id=0)


def _layout(ctx, distributed_optimizer: bool) -> dict:
    """The parallel layout a checkpoint records (``cp`` only when used, so that checkpoints
    written before context parallelism existed still compare equal)."""
    layout = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "distributed_optimizer": distributed_optimizer}
    if ctx.cp > 1:
        layout["cp"] = ctx.cp
    return layout


def _is_distributed(optimizer) -> bool:
    return any(type(o).__name__ == "DistributedOptimizer"
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers: checkpoints hold its keys only, so
    they do not depend on precision or data-parallel wrapping."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _state_dict(chunks, optimizer, scheduler, state: TrainState, ctx, is_loading: bool, with_optimizer: bool,
                with_rng: bool):
    sd = {}
    for i, chunk in enumerate(chunks):
        sd["model" if len(chunks) == 1 else f"model{i}"] = unwrap(chunk).sharded_state_dict()
    if with_optimizer:
        model_sd = {}
        for part in (sd[k] for k in sd if k.startswith("model")):
            model_sd.update(part)
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        sd["scheduler"] = scheduler.state_dict()
    sd["train_state"] = {"step": state.step, "consumed_samples": state.consumed_samples}
    if state.objective is not None:
        sd["objective"] = state.objective
    if with_rng:
        sd["rng_state"] = _rng_state(ctx)
    sd["parallel"] = _layout(ctx, _is_distributed(optimizer))
    return sd


def _restore_adam_steps(optimizer) -> None:
    """megatron-core 0.16's DistributedOptimizer on torch's Adam (no TE/Apex) keeps the step
    count in ``param_groups[i]["step"]`` in checkpoints, but its load leaves each parameter's own
    ``state["step"]`` (which torch's Adam reads for bias correction) at the placeholder value.
    Set every parameter's step from its group, one tensor per parameter (Adam increments them
    in place)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


_results_manager = None  # the Manager behind megatron-core's results queue, started by us


def _bind_save_helpers_to_this_process() -> None:
    """Make megatron-core's checkpoint-writing processes die with this (trainer) process.

    * Forked writers / async caller: a fork hook sets PDEATHSIG in every child forked from the
      main thread (``forked_children_die_with_this_process``), without touching megatron-core.
    * The spawned Manager: megatron-core creates it lazily in ``_get_write_results_queue`` only
      while the module global ``filesystem_async._results_queue`` is None, with no way to pass an
      initializer. We fill that global first with a queue from a Manager we start with
      ``die_with_parent`` as its initializer, by an attribute megatron-core already caches, not by
      replacing its code: the patch ``checkpoint_results_queue`` of
      megatron_seed.platform.megatron_patches, which pins and hash-checks it.
    """
    from megatron_seed.platform.megatron_patches import fill_checkpoint_results_queue
    from megatron_seed.platform.processes import die_with_parent, forked_children_die_with_this_process

    forked_children_die_with_this_process()
    import threading

    # PDEATHSIG fires when the *thread* that started the Manager ends: only bind one started from
    # the main thread (the trainer saves from there), which lives as long as the process.
    if threading.current_thread() is not threading.main_thread():
        return

    def manager_queue():
        global _results_manager
        import signal
        from multiprocessing.managers import SyncManager

        from torch import multiprocessing as mp

        manager = SyncManager(ctx=mp.get_context("spawn"))  # the context megatron-core itself uses
        manager.start(initializer=die_with_parent, initargs=(signal.SIGKILL, os.getpid()))
        _results_manager = manager
        return manager.Queue()

    # Only while megatron-core has no queue yet (the patch calls manager_queue only then).
    fill_checkpoint_results_queue(manager_queue)


class Checkpointer:
    def __init__(self, ctx, save_dir: Optional[str], async_save: bool = False, save_optimizer: bool = True):
        self.ctx, self.save_dir, self.async_save = ctx, save_dir, async_save
        self.save_optimizer = save_optimizer
        self._queue = None

    # ---------------------------------------------------------------- save
    def save(self, chunks, optimizer, scheduler, state: TrainState) -> str:
        from megatron.core import dist_checkpointing

        self.finalize()
        final = iteration_dir(self.save_dir, state.step)
        partial = final + ".partial"
        if self.ctx.is_main:
            os.makedirs(self.save_dir, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        torch.distributed.barrier()
        _bind_save_helpers_to_this_process()
        sd = _state_dict(chunks, optimizer, scheduler, state, self.ctx, is_loading=False,
                         with_optimizer=self.save_optimizer and optimizer is not None, with_rng=True)
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            request = dist_checkpointing.save(sd, partial, async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(partial, final))
            if self._queue is None:
                self._queue = AsyncCallsQueue()
            self._queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(sd, partial)
            torch.distributed.barrier()
            self._publish(partial, final)
            torch.distributed.barrier()
        return final

    def _publish(self, partial: str, final: str) -> None:
        if not self.ctx.is_main:
            return
        publish(partial, final, self.save_dir)

    def finalize(self, blocking: bool = True) -> None:
        """Complete pending async saves (publishing them)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._queue is not None:
            self.finalize(blocking=True)
            self._queue.close()
            self._queue = None

    # ---------------------------------------------------------------- load
    @torch.no_grad()
    def load(self, path: str, chunks, optimizer, scheduler, with_optimizer: bool = True,
             finetune: bool = False) -> TrainState:
        """Load into the given chunks (any TP/PP); optimizer and RNG when the layout allows.

        ``finetune`` (Megatron-LM's ``--finetune``): the weights, and the optimizer state only with
        ``with_optimizer``; the LR schedule, RNG, step, data position and objective state start
        fresh, so the returned TrainState is a new one."""
        from megatron.core import dist_checkpointing

        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {path} (looked for {LATEST}, iter_*/metadata.json)")
        common = dist_checkpointing.load_common_state_dict(found)
        saved = common.get("parallel", {})
        dist_opt = _is_distributed(optimizer)
        same_layout = saved == _layout(self.ctx, dist_opt)
        optimizer_fits = (saved.get("tp"), saved.get("pp"), saved.get("distributed_optimizer")) == (
            self.ctx.tp, self.ctx.pp, dist_opt) and (dist_opt or saved.get("dp") == self.ctx.dp)
        if with_optimizer and not optimizer_fits:
            if self.ctx.is_main:
                print(f"checkpoint {found} was saved with {saved}; loading the model only "
                      "(optimizer state and LR schedule start fresh)", flush=True)
            with_optimizer = False
        if with_optimizer and "scheduler" not in common:
            if self.ctx.is_main:
                print(f"checkpoint {found} holds no optimizer state (saved with train.save_optimizer=false); "
                      "loading the model only (optimizer state and LR schedule start fresh)", flush=True)
            with_optimizer = False
        with_rng = same_layout and not finetune
        if with_optimizer:
            # A fresh distributed optimizer has no Adam state to describe yet; megatron-core fills
            # it with placeholders (overwritten by the load) the same way for its own loader.
            for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
                if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                    opt._init_optimizer_states_with_dummy_values()
        sd = _state_dict(chunks, optimizer, scheduler, TrainState(), self.ctx, is_loading=True,
                         with_optimizer=with_optimizer, with_rng=with_rng)
        loaded = dist_checkpointing.load(sd, found)
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
        if optimizer is not None and not with_optimizer:
            # In bf16 the optimizer steps fp32 main params, copied from the model when it was built,
            # i.e. from the random init; without this refresh the first step writes that init plus
            # one update back over the loaded weights (as Megatron-LM does after a load without
            # the optimizer).
            optimizer.reload_model_params()
        if with_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_steps(optimizer)
            if finetune:
                # The loaded param groups carry the pretraining run's last lr and weight decay;
                # the fresh schedule sets its step-0 values again.
                scheduler.step(increment=0)
            else:
                scheduler.load_state_dict(loaded["scheduler"])
        if with_rng:
            from megatron.core import tensor_parallel

            rng = loaded["rng_state"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        return TrainState() if finetune else _train_state(loaded)
