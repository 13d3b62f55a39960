"""Assemble a run from its config: process groups, model, optimizer, data, trainer."""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_seed.config.schema import RunConfig
from megatron_seed.data.tokenizer import load_tokenizer
from megatron_seed.models.gpt import build_model_chunks
from megatron_seed.platform import distributed
from megatron_seed.training.checkpointing import Checkpointer
from megatron_seed.training.metrics import RunLogger
from megatron_seed.training.pretrain import PretrainObjective
from megatron_seed.training.setup import build_optimizer, build_scheduler, wrap_for_training
from megatron_seed.training.trainer import Trainer


def build_pretraining(run: RunConfig) -> Trainer:
    import torch

    from megatron_seed.platform import launch

    p = run.parallel
    run.validate(launch.detect().world_size)  # before any process group exists: fail fast
    ctx = distributed.initialize(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, seed=run.train.seed)
    run.validate(ctx.world_size)
    logger = RunLogger(run.train.run_dir, ctx.is_main, run.train.steps, run.train.tensorboard)
    if ctx.is_main:
        with open(os.path.join(run.train.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(run), f, indent=2)
        logger.info(f"megatron-seed pretrain: {run.name} | {run.model.num_parameters() / 1e6:.2f}M params | "
                    f"world {ctx.world_size} (tp {ctx.tp} pp {ctx.pp} dp {ctx.dp}"
                    f"{f' vpp {ctx.vpp}' if ctx.vpp else ''}) | {ctx.device} | launcher {ctx.launcher}")
    chunks = wrap_for_training(build_model_chunks(run.model, p, run.train, run.data.seq_length, run.train.seed), run)
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
        logger.info(f"resumed from {t.load} at step {trainer.state.step}")
    torch.distributed.barrier()
    return trainer
