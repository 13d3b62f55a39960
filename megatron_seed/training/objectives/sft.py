"""The supervised fine-tuning objective: conversations, packed, loss on assistant tokens only.

Data: ``data.train`` records rendered with the tokenizer's chat template and tokenized once into a
cache (megatron_seed.data.sft_data), or a prefix prebuilt by tools/preprocess_sft.py, packed whole,
best-fit-decreasing, into ``data.seq_length`` rows per epoch (megatron_seed.data.packing). The
global row order is fixed by the seed, so the data position is the number of rows consumed, which
the loop checkpoints: resume is exact.

Attention never crosses a sample boundary: on the local (CPU) spec each row carries a
block-diagonal causal mask built from its segment ids, which our SDPA core attention applies.
megatron-core's GPTModel applies RoPE at positions 0..s-1 of the row, not at the restarting
``position_ids``; under a block-diagonal mask that is the same computation, because a rotary
attention score depends only on the distance between query and key, and both lie in one sample
(the test holds packed losses to a per-conversation transformers reference at 1e-5).

Loss: normalized per token over the whole global batch (megatron-core's
``calculate_per_token_loss``), so how rows are split over micro-batches and ranks does not change
it; the logged ``loss`` is the optimized one. Metrics: ``loss``, ``loss_tokens`` (the step's
tokens with loss), ``packing_efficiency`` (real tokens / slots of the step's rows).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch

from megatron_seed.training.objective import TOKENS, Objective, ObjectiveNeeds, builds
from megatron_seed.training.objectives.common import (masked_loss, objective_cache_dir, on_rank0_first,
                                                      packed_micro_batches, run_chat_tokenizer)


def sft_loss(loss_mask: torch.Tensor, real: torch.Tensor, per_token_loss: torch.Tensor):
    loss_sum, count = masked_loss(loss_mask, per_token_loss)
    real_tokens = real.sum().to(torch.float64)
    report = {
        "lm loss": torch.stack([loss_sum.detach(), count]),
        # summed, not averaged, over the step (Objective.sum_keys)
        "loss_tokens": torch.stack([count, torch.ones(())]),
        "packing_efficiency": torch.tensor([float(real_tokens), float(real.numel())], dtype=torch.float64),
        TOKENS: torch.tensor([float(real_tokens), float(real.shape[0])], dtype=torch.float64),
    }
    return loss_sum, count.to(torch.int), report


class SFTObjective(Objective):
    name = "sft"
    loss_key = "lm loss"
    metric_keys = ("lm loss", "loss_tokens", "packing_efficiency")
    sum_keys = ("loss_tokens",)
    loss_normalization = "per_token"
    # data.train conversations; without them, data.blend / data.mock is checked as for pretraining.
    needs = ObjectiveNeeds(token_data=True, context_parallel=True)  # a per-token loss splits with the sequence

    def __init__(self, datasets: list, micro_batch_size: int, dp_rank: int, dp_size: int, device,
                 packed_format: str = "mask"):
        self.datasets = datasets  # [train, valid] PackedSFTDataset or None
        self.micro_batch_size, self.dp_rank, self.dp_size, self.device = micro_batch_size, dp_rank, dp_size, device
        self.packed_format = packed_format  # "mask" or "thd" (resolve_packed_format)

    def data_iterator(self, split: int, consumed_samples: int) -> Optional[Iterator[dict]]:
        dataset = self.datasets[split] if split < len(self.datasets) else None
        if dataset is None:
            return None
        return packed_micro_batches(dataset, consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size,
                                    self.device)

    def forward_step(self, data_iterator, model):
        from megatron_seed.data.packing import attention_mask_for

        batch = next(data_iterator)
        if self.packed_format == "thd":  # the micro-batch as one row of sequences (sft_loss flattens anyway)
            from megatron_seed.data.packing import packed_seq_params_for

            row = {k: batch[k].reshape(1, -1) for k in ("tokens", "position_ids", "labels", "loss_mask")}
            output = model(row["tokens"], row["position_ids"], None, labels=row["labels"], loss_mask=row["loss_mask"],
                           packed_seq_params=packed_seq_params_for(batch["segment_ids"]))
        else:
            output = model(batch["tokens"], batch["position_ids"], attention_mask_for(batch), labels=batch["labels"],
                           loss_mask=batch["loss_mask"])  # see PretrainObjective.forward_step
        return output, partial(sft_loss, batch["loss_mask"], batch["segment_ids"] > 0)


@builds(SFTObjective)
def build_sft_objective(run, ctx, tokenizer) -> SFTObjective:
    """Tokenize (or reuse the cache of) ``data.train`` / ``data.valid`` on rank 0 first, then on
    the other ranks from the cache, and pack them. A prefix from tools/preprocess_sft.py is opened
    on every rank and checked against the run's tokenizer and options instead."""
    from megatron_seed.config.schema import ConfigError
    from megatron_seed.data.packing import PackedSFTDataset
    from megatron_seed.data.sft_data import build_sft_data, sft_prefix

    d, t = run.data, run.train
    if not d.train:
        raise ConfigError("the sft objective needs data.train=FILE (jsonl, jsonl.gz or parquet conversations) or "
                          "data.train=PREFIX (written by tools/preprocess_sft.py)")
    packed_format = resolve_packed_format(run)  # a config error before any tokenizing
    chat = run_chat_tokenizer(run)
    cache = objective_cache_dir(run, "sft")
    datasets = []
    for split in (d.train, d.valid):
        if not split:
            datasets.append(None)
            continue
        build = partial(build_sft_data, [split], chat, cache, d.seq_length, overflow=d.overflow,
                        train_on_all_tokens=d.train_on_all_tokens)
        # prebuilt: every rank opens and checks it (SFTPrefixError is a ConfigError)
        data = build() if sft_prefix(split) else on_rank0_first(build, ctx)
        if ctx.is_main:
            print(f"[sft] {split}: {data.summary.line()}", flush=True)
        datasets.append(PackedSFTDataset(data, d.seq_length, chat.pad_id, t.seed, packing=d.packing))
    return SFTObjective(datasets, t.micro_batch_size, ctx.dp_rank, ctx.dp, ctx.device, packed_format)


def resolve_packed_format(run) -> str:
    """data.packed_format, with auto made concrete: Transformer Engine's causal attention ignores
    an attention mask, so on its spec packed samples are kept apart only by THD's cu_seqlens."""
    from megatron_seed.config.schema import ConfigError
    from megatron_seed.models.gpt import resolve_impl

    te = resolve_impl(run.model) == "transformer_engine"
    chosen = run.data.packed_format
    if chosen == "auto":
        chosen = "thd" if te else "mask"
        if chosen == "thd":
            run.check_thd_packing(why=" (data.packed_format=auto on the Transformer Engine spec)")
    if te and chosen == "mask":
        raise ConfigError("data.packed_format=mask on the Transformer Engine spec: its causal attention ignores the "
                          "mask, so packed samples would attend to each other; use data.packed_format=thd (or auto)")
    return chosen
