"""Assemble a run from its config: process groups, model, optimizer, data, trainer."""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_seed.config.schema import ConfigError, ModelConfig, RunConfig
from megatron_seed.convert import checkpoint_io
from megatron_seed.data.tokenizer import load_tokenizer
from megatron_seed.models.gpt import build_model_chunks
from megatron_seed.platform import distributed
from megatron_seed.training.checkpointing import Checkpointer
from megatron_seed.training.metrics import RunLogger
from megatron_seed.training.pretrain import PretrainObjective
from megatron_seed.training.setup import (build_optimizer, build_scheduler, use_fused_cpu_adam,
                                         wrap_for_training)
from megatron_seed.training.trainer import Trainer


def build_pretraining(run: RunConfig) -> Trainer:
    import torch

    from megatron_seed.platform import launch

    p = run.parallel
    run.validate(launch.detect().world_size)  # before any process group exists: fail fast
    ctx = distributed.initialize(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, seed=run.train.seed)
    run.validate(ctx.world_size)
    run = resolve_run_precision(run, ctx)
    if ctx.device.type == "cpu" and run.train.cpu_reuse_freed_memory:
        from megatron_seed.platform.cpu_allocator import keep_freed_memory

        keep_freed_memory()
    logger = RunLogger(run.train.run_dir, ctx.is_main, run.train.steps, run.train.tensorboard)
    if run.train.load:
        check_checkpoint_model(run.train.load, run.model)
    if ctx.is_main:
        with open(os.path.join(run.train.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(run), f, indent=2)
        if run.train.save:
            # Checkpoints carry the model config and tokenizer: conversion and generation read
            # them from the checkpoint directory alone.
            checkpoint_io.write_model_config(run.train.save, run.model)
            checkpoint_io.copy_tokenizer_files(run.data.tokenizer or "byte", run.train.save)
        logger.info(f"megatron-seed pretrain: {run.name} | {run.model.num_parameters() / 1e6:.2f}M params | "
                    f"world {ctx.world_size} (tp {ctx.tp} pp {ctx.pp} dp {ctx.dp}"
                    f"{f' vpp {ctx.vpp}' if ctx.vpp else ''}) | {ctx.device} | launcher {ctx.launcher}")
    model_chunks = build_model_chunks(run.model, p, run.train, run.data.seq_length, run.train.seed)
    if run.train.compile and ctx.is_main:
        from megatron_seed.models.compile import compiled_modules

        logger.info(f"train.compile: {compiled_modules(model_chunks)} modules compiled (RMSNorm, SwiGLU)")
    chunks = wrap_for_training(model_chunks, run)
    optimizer = build_optimizer(chunks, run)
    scheduler = build_scheduler(optimizer, run)
    tokenizer = load_tokenizer(run.data.tokenizer)
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than "
                         f"model.vocab_size ({run.model.vocab_size})")
    t = run.train
    eval_samples = t.global_batch_size * t.eval_steps * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    from megatron_seed.data.datasets import build_datasets

    datasets = build_datasets(run.data, t.seed, run.model.vocab_size, tokenizer.eod,
                              (t.steps * t.global_batch_size, eval_samples, 0))
    objective = PretrainObjective(datasets, t.micro_batch_size, ctx.dp_rank, ctx.dp, ctx.device)
    trainer = Trainer(run, ctx, chunks, optimizer, scheduler, objective,
                      Checkpointer(ctx, t.save, t.async_save), logger)
    if t.load:
        trainer.state = trainer.checkpointer.load(t.load, chunks, optimizer, scheduler)
        use_fused_cpu_adam(optimizer)  # loading restores param groups as saved (maybe unfused)
        logger.info(f"resumed from {t.load} at step {trainer.state.step}")
    torch.distributed.barrier()
    return trainer


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
                 if os.path.exists(os.path.join(d, checkpoint_io.MODEL_CONFIG))), None)
    if root is None:
        return
    saved = checkpoint_io.read_model_config(root)
    diffs = [f"model.{f}={getattr(saved, f)}" for f in _SHAPE_FIELDS if getattr(saved, f) != getattr(model, f)]
    if diffs:
        raise ConfigError(f"train.load={load_dir} holds a different model; set {' '.join(diffs)} "
                          f"(or use the preset it was trained with)")
