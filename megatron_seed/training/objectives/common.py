"""The toolbox the objectives share: packed micro-batches, a batch on the device, the data cache,
the masked loss sum, the chat tokenizer, rank 0 building a cache first, a frozen reference model.

Objectives import this module and the layers below training, never one another: what two of them
need lives here once.
"""

from __future__ import annotations

import os

import torch

from megatron_seed.data.datasets import to_device


def masked_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 sum of the per-token losses where ``loss_mask`` is set, and how many tokens that is
    (a float tensor): the loss of pretraining and SFT, which the schedule or, per token,
    ``finalize_model_grads`` divides by the count."""
    mask = loss_mask.reshape(-1).float()
    return (per_token_loss.float().reshape(-1) * mask).sum(), mask.sum()


def collate_rows(rows: list, device) -> dict:
    """Packed rows (megatron_seed.data.packing) as one micro-batch on ``device``: int64 ids and
    positions, a float loss mask."""
    from megatron_seed.data.packing import collate

    batch = collate(rows)
    return to_device({k: (v.long() if k != "loss_mask" else v.float()) for k, v in batch.items()}, device)


def packed_micro_batches(dataset, consumed_rows: int, micro_batch_size: int, dp_rank: int, dp_size: int, device):
    """Endless micro-batches of packed rows for one data-parallel rank. Rows are numbered across
    epochs (epoch 0's rows, then epoch 1's, each epoch packed anew from its own shuffle); each step
    covers the next ``micro_batch_size * dp_size`` rows, rank r taking its contiguous share."""

    def locate(g: int) -> tuple[int, int]:
        epoch = 0
        while g >= dataset.num_rows(epoch):
            g -= dataset.num_rows(epoch)
            epoch += 1
        return epoch, g

    position = consumed_rows
    while True:
        start = position + dp_rank * micro_batch_size
        rows = [dataset.row(*locate(start + i)) for i in range(micro_batch_size)]
        position += micro_batch_size * dp_size
        yield collate_rows(rows, device)


def objective_cache_dir(run, objective: str) -> str:
    """Where an objective keeps what it derives from its data (tokenized samples, reference
    log-probs, built problems): ``data.cache_dir``, or ``~/.cache/megatron_seed/<objective>``."""
    return run.data.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "megatron_seed", objective)


def run_chat_tokenizer(run):
    """The chat tokenizer of ``data.tokenizer`` / ``data.chat_template``, checked against the model."""
    from megatron_seed.config.schema import ConfigError
    from megatron_seed.data.chat import load_chat_tokenizer

    chat = load_chat_tokenizer(run.data.tokenizer, run.data.chat_template)
    if chat.vocab_size > run.model.vocab_size:
        raise ConfigError(f"the chat tokenizer's vocabulary ({chat.vocab_size}) is larger than "
                          f"model.vocab_size ({run.model.vocab_size})")
    return chat


def on_rank0_first(build, ctx):
    """``build()`` on rank 0, which tokenizes and publishes a cache, then on the other ranks, which
    read it: one tokenization per job however many ranks."""
    data = build() if ctx.rank == 0 else None
    torch.distributed.barrier()
    return build() if data is None else data


def build_reference_chunks(run, ctx, ref_load: str) -> list:
    """A frozen reference model (DPO's reference, RL's KL anchor) with the run's layout and
    precision, weights from ``ref_load``, in eval mode and without gradients."""
    from megatron.core.transformer.module import Float16Module

    from megatron_seed.checkpoint.checkpointer import Checkpointer
    from megatron_seed.models.gpt import build_model_chunks

    chunks = build_model_chunks(run.model, run.parallel, run.train, run.data.seq_length, run.train.seed)
    Checkpointer(ctx, None).load(ref_load, chunks, None, None, with_optimizer=False, finetune=True)
    if run.train.precision == "bf16":
        chunks = [Float16Module(chunks[0].config, c) for c in chunks]
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
