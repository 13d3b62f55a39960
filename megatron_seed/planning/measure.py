"""Measure on this machine what the memory plan models, category by category.

The real training stack is assembled as ``training/build.py`` does (model chunks, megatron-core
DDP with its fp32 grad buffer, the megatron optimizer) and the trainer's own step
(:class:`~megatron_seed.training.trainer.Trainer`) runs on a synthetic objective, pretraining on
random tokens, under :class:`LiveStorageBytes`, a dispatch mode that counts every tensor storage
created inside it until it is freed, on CPU as on GPU. (torch's ``MemTracker`` does the same with
categories, but refuses a second forward of the root module, i.e. a second micro-batch, and calls
``module.buffers()``, which megatron-core's DDP shadows with a list.) With ``parallel.context`` the
trainer cuts the micro-batches to each rank's part of the sequences and makes the loss whole over
the group, as it does in training.

* weights: bytes of this rank's parameters; gradients: bytes of the DDP grad buffers;
* optimizer state: the storages the optimizer holds besides the parameters (fp32 master weights,
  Adam's m and v), after its first step;
* activations + logits: the peak of tensors alive during the second step's forward and backward
  passes (all micro-batches), above everything that existed before it, plus the buffers the first
  step left behind that are not the optimizer's (megatron-core's sequence-parallel all-gather
  buffer, cached masks).

Process memory (RSS on CPU) cannot isolate these: it also holds the Python/torch runtime, and for
small models that runtime is most of it.
"""

from __future__ import annotations

import copy
import weakref
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_seed.config.schema import RunConfig
from megatron_seed.training.objectives.pretrain import PretrainObjective


class LiveStorageBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops allocate while the mode is active and that are still
    alive (``current``), and their maximum (``peak``). Tensors from before, such as parameters,
    are never counted, even when an op returns a view of them."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.current -= nbytes

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        nbytes = storage.nbytes()
        # torch keeps one Python object per storage while the storage lives, so this callback
        # runs when the memory is released.
        self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing storage with an input allocated nothing: views, in-place ops, and
        # collectives (c10d's ops return their output buffers without an alias annotation).
        given = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _dense(t)}
        for value in tree_flatten(out)[0]:
            if _dense(value) and id(value.untyped_storage()) not in given:
                self._add(value)
        return out


def _dense(value) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and value.device.type != "meta"


def _batches(run: RunConfig, device, seed: int):
    """Endless synthetic micro-batches shaped like the pretraining objective's."""
    b, s, v = run.train.micro_batch_size, run.data.seq_length, run.model.vocab_size
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, v, (b, s + 1), generator=generator)
        yield {"tokens": tokens[:, :-1].contiguous().to(device), "labels": tokens[:, 1:].contiguous().to(device),
               "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous().to(device),
               "loss_mask": torch.ones(b, s, device=device)}


class SyntheticObjective(PretrainObjective):
    """The pretraining objective (its forward step, masked LM loss and per-micro-batch
    normalization) on :func:`_batches` from ``seed``: no data files to read."""

    name = "synthetic"

    def __init__(self, run: RunConfig, seed: int, device):
        super().__init__(None, run.train.micro_batch_size, 0, 1, device)
        self.run, self.seed = run, seed

    def data_iterator(self, split: int, consumed_samples: int):
        return _batches(self.run, self.device, self.seed)


def measure_training_memory(run: RunConfig, seed: int = 1234) -> dict:
    """Bytes per category on this rank for ``run``'s layout (processes and groups from the
    launcher's environment: one process, or torchrun). Tears down the process groups it started."""
    from megatron_seed.models.gpt import build_model_chunks
    from megatron_seed.platform import distributed
    from megatron_seed.training.build import resolve_run_precision
    from megatron_seed.training.optimizer_setup import build_optimizer, build_scheduler, wrap_for_training
    from megatron_seed.training.trainer import Trainer

    p = run.parallel
    started = not torch.distributed.is_initialized()
    ctx = distributed.initialize(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, seed=seed, cp=p.context)
    try:
        run = resolve_run_precision(copy.deepcopy(run), ctx)
        chunks = build_model_chunks(run.model, p, run.train, run.data.seq_length, seed)
        for chunk in chunks:
            chunk.config.calculate_per_token_loss = False  # the synthetic objective's normalization
        wrapped = wrap_for_training(chunks, run)
        weights = sum(t.numel() * t.element_size() for t in {id(q): q for c in wrapped for q in c.parameters()}.values())
        gradients = sum(b.grad_data.numel() * b.grad_data.element_size()
                        for c in wrapped for b in c.buffers + c.expert_parallel_buffers)
        # Every rank of a context-parallel group draws the same sequences and keeps its part, as in
        # training (the same dp_rank, hence the same seed, across the group).
        objective = SyntheticObjective(run, seed + ctx.dp_rank, ctx.device)
        # The optimizer state: master weights when the optimizer is built, Adam's moments in its
        # first step. The trainer is built in between, outside the count: it keeps no tensors, but
        # times the CPU's peak FLOPs (for MFU) with tensors of its own.
        with LiveStorageBytes() as built:
            optimizer = build_optimizer(wrapped, run)
        trainer = Trainer(run, ctx, wrapped, optimizer, build_scheduler(optimizer, run), objective,
                          checkpointer=None, logger=None)  # steps only: it never saves or logs
        iterators = trainer._iterators(0, 0)
        with LiveStorageBytes() as first:
            trainer.train_step(iterators)
        optimizer_state = _optimizer_bytes(optimizer, wrapped)
        # Whatever else step 1 left allocated: buffers megatron-core keeps between steps (the
        # sequence-parallel all-gather buffer, cached masks); they hold activations.
        persistent = built.current + first.current - optimizer_state
        # Step 2: its forward and backward passes only; what they allocate beyond the standing state.
        with LiveStorageBytes() as second:
            trainer.forward_backward_step(iterators)
        dynamic = second.peak + persistent
        return {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp": ctx.dp, "cp": ctx.cp,
                "precision": run.train.precision, "weights": weights, "gradients": gradients,
                "optimizer": optimizer_state, "activations_and_logits": dynamic,
                "persistent_buffers": persistent, "total": weights + gradients + optimizer_state + dynamic}
    finally:
        if started:
            distributed.shutdown()


def _optimizer_bytes(optimizer, chunks) -> int:
    """Storages the optimizer holds besides the model's parameters: fp32 master weights (or their
    shards) and Adam's moments."""
    from megatron_seed.training.optimizer_setup import _torch_optimizers

    model = {id(p.untyped_storage()) for c in chunks for p in c.parameters()}
    held = {}
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state.get(param, {})
                for tensor in [param, *(v for v in state.values() if isinstance(v, torch.Tensor))]:
                    storage = tensor.untyped_storage()
                    if id(storage) not in model:
                        held[id(storage)] = storage.nbytes()
    return sum(held.values())


def compare(plan_stage, measured: dict) -> list[tuple[str, int, int, Optional[float]]]:
    """(category, planned, measured, relative error) rows; activations, logits and the backward
    working set are compared together, as one peak (the GPU allowance is not measured)."""
    dynamic = plan_stage.activations + plan_stage.logits + plan_stage.backward_working_set
    rows = [("weights", plan_stage.weights, measured["weights"]),
            ("gradients", plan_stage.gradients, measured["gradients"]),
            ("optimizer state", plan_stage.optimizer, measured["optimizer"]),
            ("activations + logits", dynamic, measured["activations_and_logits"]),
            ("total", plan_stage.total - plan_stage.allowance, measured["total"])]
    return [(name, planned, got, (planned - got) / got if got else None) for name, planned, got in rows]


def measure_against_plan(run: RunConfig) -> Optional[str]:
    """Measure ``run``'s layout here and set it against its plan (the plan for this device, this
    rank's pipeline stage, the precision the run resolved to). Text on the first rank, else None."""
    from megatron_seed.planning.memory import plan_memory

    measured = measure_training_memory(run)
    planned_run = copy.deepcopy(run)
    planned_run.train.precision = measured["precision"]
    world = measured["dp"] * run.parallel.tensor * run.parallel.pipeline * run.parallel.context
    device = "gpu" if torch.cuda.is_available() else "cpu"
    stage = plan_memory(planned_run, world, device, with_suggestions=False).stages[measured["pp_rank"]]
    if measured["rank"] != 0:
        return None
    lines = [f"measured on this {device} (rank 0, pipeline rank {measured['pp_rank']}, {measured['precision']}):",
             f"  {'':<22}{'planned':>12}{'measured':>12}{'error':>9}"]
    for name, planned, got, error in compare(stage, measured):
        lines.append(f"  {name:<22}{planned / 2**20:>8.1f} MiB{got / 2**20:>8.1f} MiB"
                     f"{'' if error is None else f'{100 * error:>+8.1f}%'}")
    return "\n".join(lines)
