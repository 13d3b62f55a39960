"""The pretraining objective: next-token cross-entropy over packed GPTDataset sequences."""

from __future__ import annotations

from functools import partial

import torch

from megatron_seed.data.datasets import micro_batches


def lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked per-token losses and the token count: megatron's schedule divides."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


class PretrainObjective:
    """Per-objective part of a step: where batches come from and what the loss is."""

    name = "pretrain"

    def __init__(self, datasets, micro_batch_size: int, dp_rank: int, dp_size: int, device):
        self.datasets = datasets
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.device = dp_rank, dp_size, device

    def data_iterator(self, split: int, consumed_samples: int):
        dataset = self.datasets[split]
        if dataset is None:
            return None
        return micro_batches(dataset, consumed_samples, self.micro_batch_size, self.dp_rank,
                             self.dp_size, self.device)

    @staticmethod
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(lm_loss, batch["loss_mask"])
