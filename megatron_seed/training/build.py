"""Assemble a run from its config and an objective: process groups, model, optimizer, trainer.

``build_trainer(run, objective_factory)`` is the one assembly every objective uses (pretrain, SFT,
DPO, RL, a plugin's): the objective supplies data, loss and metrics, everything else is here.
``build_run(run)`` builds the trainer of the objective ``train.objective`` names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from megatron_seed.checkpoint.checkpointer import Checkpointer, TrainState, read_train_state
from megatron_seed.checkpoint.layout import MODEL_CONFIG, copy_tokenizer_files, read_model_config, write_model_config
from megatron_seed.config.schema import ConfigError, ModelConfig, RunConfig, TrainConfig
from megatron_seed.data.tokenizer import load_tokenizer
from megatron_seed.models.gpt import build_model_chunks
from megatron_seed.platform import distributed
from megatron_seed.training.metrics import RunLogger
from megatron_seed.training.objective import CONFIG_CHECKS, ObjectiveFactory, check_objective, resolve_objective
from megatron_seed.training.optimizer_setup import (build_optimizer, build_scheduler, use_fused_cpu_adam,
                                         wrap_for_training)
from megatron_seed.training.trainer import Trainer


def build_run(run: RunConfig) -> Trainer:
    """The trainer of a run: the objective that ``train.objective`` names (``pretrain`` by default;
    the ``sft``, ``dpo`` and ``rl`` entry points set it)."""
    return build_trainer(run, resolve_objective(run.train.objective))


def build_trainer(run: RunConfig, objective_factory: ObjectiveFactory) -> Trainer:
    """Process groups, the objective (``objective_factory(run, ctx, tokenizer)``), model chunks
    wrapped for the objective's loss normalization, optimizer, LR schedule and, with
    ``train.load``, the checkpoint's state (or only its weights with ``train.finetune``)."""
    import torch

    from megatron_seed.platform import launch

    p, t = run.parallel, run.train
    run.validate(launch.detect().world_size, CONFIG_CHECKS)  # before any process group exists: fail fast
    ctx = distributed.initialize(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, seed=t.seed, cp=p.context)
    run.validate(ctx.world_size, CONFIG_CHECKS)
    saved: Optional[TrainState] = None
    if t.load:  # a checkpoint that cannot serve this run is a config error, before any model exists
        check_checkpoint_model(t.load, run.model)
        saved = check_checkpoint_step(t.load, t)
    run = resolve_run_precision(run, ctx)
    t = run.train
    if ctx.device.type == "cpu" and t.cpu_reuse_freed_memory:
        from megatron_seed.platform.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    threads = None
    if ctx.device.type == "cpu" and t.cpu_threads_main_only:
        from megatron_seed.platform.cpu_threads import keep_intra_op_threads_on_main

        threads = keep_intra_op_threads_on_main()
    logger = RunLogger(t.run_dir, ctx.is_main, t.steps, t.tensorboard)
    if threads is not None and ctx.is_main:
        logger.info(f"cpu threads: {threads}")
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ConfigError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than "
                          f"model.vocab_size ({run.model.vocab_size})")
    objective = check_objective(objective_factory(run, ctx, tokenizer))
    if saved is not None and not t.finetune:
        check_checkpoint_objective(t.load, saved, objective.name)
    if ctx.is_main:
        with open(os.path.join(t.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(run), f, indent=2)
        if t.save:
            # Checkpoints carry the model config and tokenizer: conversion and generation read
            # them from the checkpoint directory alone.
            write_model_config(t.save, run.model)
            copy_tokenizer_files(run.data.tokenizer or "byte", t.save)
        logger.info(f"megatron-seed {objective.name}: {run.name} | {run.model.num_parameters() / 1e6:.2f}M params | "
                    f"world {ctx.world_size} (tp {ctx.tp} pp {ctx.pp} dp {ctx.dp}"
                    f"{f' vpp {ctx.vpp}' if ctx.vpp else ''}{f' cp {ctx.cp}' if ctx.cp > 1 else ''}) | {ctx.device} | launcher {ctx.launcher}")
    model_chunks = build_model_chunks(run.model, p, t, run.data.seq_length, t.seed)
    if ctx.is_main:
        from megatron_seed.models.kernel_selection import describe_kernels

        logger.info(f"model.kernels={run.model.kernels}: {describe_kernels(model_chunks)}")
    if t.compile and ctx.is_main:
        from megatron_seed.models.compile import compiled_modules

        logger.info(f"train.compile: {compiled_modules(model_chunks)} modules compiled (RMSNorm, SwiGLU)")
    # megatron-core's DDP reads this when wrapping (sum instead of mean over data-parallel ranks;
    # finalize_model_grads then divides by the global loss-token count).
    for chunk in model_chunks:
        chunk.config.calculate_per_token_loss = objective.loss_normalization == "per_token"
    chunks = wrap_for_training(model_chunks, run)
    optimizer = build_optimizer(chunks, run)
    scheduler = build_scheduler(optimizer, run)
    trainer = Trainer(run, ctx, chunks, optimizer, scheduler, objective,
                      Checkpointer(ctx, t.save, t.async_save, t.save_optimizer), logger)
    if t.load:
        state = trainer.checkpointer.load(t.load, chunks, optimizer, scheduler,
                                          with_optimizer=not t.finetune or t.finetune_load_optimizer,
                                          finetune=t.finetune)
        use_fused_cpu_adam(optimizer)  # loading restores param groups as saved (maybe unfused)
        if state.objective is not None:
            objective.load_state_dict(state.objective["state"])
        trainer.state = state
        logger.info(f"fine-tuning from the weights of {t.load} (step {saved.step}), starting at step 0"
                    if t.finetune else f"resumed from {t.load} at step {state.step}")
    objective.bind_model(chunks)
    torch.distributed.barrier()
    return trainer


def check_checkpoint_step(load: str, train: TrainConfig) -> TrainState:
    """A checkpoint already at (or past) ``train.steps`` would run zero steps: stop and say why."""
    found, saved = read_train_state(load)
    if not train.finetune and saved.step >= train.steps:
        raise ConfigError(
            f"train.load={load}: checkpoint {os.path.basename(found)} has already run {saved.step} steps "
            f"and train.steps={train.steps}, so there is nothing to train. To start a new run from its "
            f"weights at step 0 (fine-tuning), set train.finetune=true; to continue this run, set "
            f"train.steps above {saved.step}")
    return saved


def check_checkpoint_objective(load: str, saved: TrainState, name: str) -> None:
    """Resuming continues the same objective; starting another one from these weights is a
    fine-tune (its data position and state mean nothing to the new objective)."""
    if saved.objective is not None and saved.objective.get("name") != name:
        raise ConfigError(f"train.load={load} was written by objective {saved.objective.get('name')!r}, "
                          f"this run trains {name!r}: set train.finetune=true to start from its weights")


def resolve_run_precision(run: RunConfig, ctx) -> RunConfig:
    """``train.precision=auto`` becomes bf16 or fp32 (megatron_seed.platform.precision). Every rank
    probes its own device and all ranks take bf16 only if every one of them runs it natively: one
    AVX2-only host in a job makes the whole job fp32 instead of 400x slower on that host."""
    import torch

    from megatron_seed.platform import precision

    choice = precision.choose(run.train.precision, ctx.device.type)
    if run.train.precision == "auto":
        native = torch.tensor([1 if choice.precision == "bf16" else 0], dtype=torch.int32, device=ctx.device)
        torch.distributed.all_reduce(native, op=torch.distributed.ReduceOp.MIN)
        if not int(native.item()) and choice.precision == "bf16":
            choice = precision.PrecisionChoice("fp32", "auto", "auto -> fp32: another rank has no native bf16")
    if ctx.is_main:
        precision.log_choice(choice)
    if run.train.fp8 and choice.precision != "bf16" and ctx.device.type == "cuda":
        raise ConfigError("train.fp8 with Transformer Engine needs train.precision=bf16 (or auto on a GPU with bf16)")
    return dataclasses.replace(run, train=dataclasses.replace(run.train, precision=choice.precision))


_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "tie_embeddings")


def check_checkpoint_model(load_dir: str, model: ModelConfig) -> None:
    """A checkpoint whose model differs from the configured one fails here, with the fields to set,
    instead of deep inside megatron-core's loader."""
    root = next((d for d in (load_dir, os.path.dirname(os.path.abspath(load_dir)))
                 if os.path.exists(os.path.join(d, MODEL_CONFIG))), None)
    if root is None:
        return
    saved = read_model_config(root)
    diffs = [f"model.{f}={getattr(saved, f)}" for f in _SHAPE_FIELDS if getattr(saved, f) != getattr(model, f)]
    if diffs:
        raise ConfigError(f"train.load={load_dir} holds a different model; set {' '.join(diffs)} "
                          f"(or use the preset it was trained with)")
