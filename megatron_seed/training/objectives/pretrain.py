"""The pretraining objective: next-token cross-entropy over packed GPTDataset sequences.

(``megatron_seed.pretrain`` is the CLI; this is ``megatron_seed.training.objectives.pretrain``.)
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_seed.data.datasets import micro_batches
from megatron_seed.training.objective import TOKENS, Objective, ObjectiveNeeds, builds
from megatron_seed.training.objectives.common import masked_loss


def lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of masked per-token losses and the token count (the schedule or, per token,
    ``finalize_model_grads`` divides), and the report: the loss as (sum, count) and the
    micro-batch's tokens, all real in packed pretraining sequences."""
    loss_sum, count = masked_loss(loss_mask, per_token_loss)
    tokens = torch.tensor([loss_mask.numel(), loss_mask.shape[0]], dtype=torch.float64)
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count]), TOKENS: tokens}


class PretrainObjective(Objective):
    """Batches from megatron-core GPT datasets by consumed-sample position; masked LM loss.

    ``per_microbatch`` normalization, megatron-core's default, keeps the committed loss golden
    (tests/assets/losses/tiny.json): GPTDataset zeroes the loss mask where a label equals the pad
    id, so micro-batches differ by a token or two of loss and per-token normalization moves the
    golden's losses by up to 3e-5 by step 8 (measured). With all-ones masks the two coincide.
    """

    name = "pretrain"
    loss_key = "lm loss"
    metric_keys = ("lm loss",)
    loss_normalization = "per_microbatch"
    needs = ObjectiveNeeds(token_data=True, context_parallel=True)  # a per-token loss splits with the sequence

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

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        # loss_mask lets a fused lm-head loss skip masked positions (model.kernels); unused otherwise.
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
        return output, partial(lm_loss, batch["loss_mask"])


@builds(PretrainObjective)
def build_pretrain_objective(run, ctx, tokenizer) -> PretrainObjective:
    """Train/validation/test datasets sized for the run (``train.steps`` global batches, and the
    validation passes ``train.eval_interval`` asks for) from ``data``."""
    from megatron_seed.data.datasets import build_datasets

    t = run.train
    eval_samples = t.global_batch_size * t.eval_steps * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    datasets = build_datasets(run.data, t.seed, run.model.vocab_size, tokenizer.eod,
                              (t.steps * t.global_batch_size, eval_samples, 0))
    return PretrainObjective(datasets, t.micro_batch_size, ctx.dp_rank, ctx.dp, ctx.device)
