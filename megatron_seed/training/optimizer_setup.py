"""Wrap model chunks for training: precision module, megatron DDP, optimizer, LR scheduler."""

from __future__ import annotations

import torch

from megatron_seed.config.schema import RunConfig


def wrap_for_training(chunks: list, run: RunConfig) -> list:
    """bf16 chunks get megatron's Float16Module; every chunk gets megatron-core DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=run.parallel.overlap_grad_reduce,
        overlap_param_gather=run.parallel.overlap_param_gather,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        if run.train.precision == "bf16":
            chunk = Float16Module(config, chunk)
        # Only the first chunk buckets grads: later chunks' grads are ready at once anyway.
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0))
    return wrapped


def build_optimizer(chunks: list, run: RunConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = run.optimizer
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr_value, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=run.train.precision == "bf16",
        params_dtype=chunks[0].config.params_dtype,
        use_distributed_optimizer=run.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    use_fused_cpu_adam(optimizer)
    return optimizer


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    if hasattr(optimizer, "chained_optimizers"):
        return [t for o in optimizer.chained_optimizers for t in _torch_optimizers(o)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


def use_fused_cpu_adam(optimizer) -> None:
    """Without Transformer Engine or apex, megatron-core falls back to ``torch.optim.AdamW`` with
    its default multi-tensor (foreach) kernels. On CPU torch also has a fused AdamW kernel (one
    pass per tensor, no temporaries): 62 ms vs 278 ms per step for 100M float32 parameters on 2
    cores. Same update rule; only the rounding of intermediate results differs. On CUDA nothing
    changes (TE/apex FusedAdam, or torch's defaults)."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, torch.optim.AdamW):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if not params or any(p.device.type != "cpu" for p in params):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False


def build_scheduler(optimizer, run: RunConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = run.optimizer
    decay_steps = max(o.decay_steps or run.train.steps, o.warmup_steps + 1)
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant", "linear": "linear"}[o.schedule]
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr_value,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
        wsd_decay_steps=o.wsd_decay_steps if o.schedule == "wsd" else None,
        lr_wsd_decay_style=o.wsd_decay_style if o.schedule == "wsd" else None,
    )
