"""The DPO objective: preference pairs, packed, scored against a reference model's log-probs.

Data: ``data.train`` pairs (TRL's format: ``prompt`` a string or messages, ``chosen`` /
``rejected`` strings or assistant messages) rendered with the chat template exactly as SFT renders
a prompt + completion (megatron_seed.data.preference_data), tokenized once into a cache. A pair's
chosen and rejected sequences always travel in the same row: pairs are packed whole,
best-fit-decreasing, into ``data.seq_length`` rows, chosen then rejected, each its own segment of
the block-diagonal causal mask (``data.packing=false``: one pair per row). Segment ``2k+1`` is the
chosen and ``2k+2`` the rejected sequence of the row's k-th pair, whose index in the data set is
``pair_index[k]``.

Log-probs: a sequence's log-prob is the **sum over its completion tokens** (the assistant
content and end-of-turn token, where SFT puts its loss), as TRL's default. The model's per-token
loss is ``-log p(label)``, so the sums are a masked scatter-add per segment.

Reference (``ref.load``, default: the checkpoint the policy starts from, ``train.load``):

* ``ref.mode=precomputed`` (default): before training, the reference model is built with the
  run's parallel layout, its weights loaded, and one forward-only pass of megatron-core's pipeline
  schedule over every pair (train and validation) gives the reference log-probs, stored beside
  the data (``data.cache_dir/dpo-ref-<key>.npy``; the key covers the pairs, the reference
  checkpoint and the precision) and reused by later runs and resumes. The reference model is freed
  before the policy is built: training holds one model.
* ``ref.mode=live``: the reference model stays in memory and scores each micro-batch next to the
  policy (pipeline parallelism 1 only: the reference's activations would need their own
  pipeline messages). Both modes give the same losses (tested).

Loss (megatron_seed.training.objectives.dpo_loss): ``dpo.loss_type`` sigmoid / robust / ipo / hinge with
``dpo.beta`` and ``dpo.label_smoothing``, plus ``dpo.sft_weight`` x the chosen sequence's mean
token NLL (RPO). Normalized per pair over the whole global batch (the loop's per-token
normalization with pairs as the unit), so micro-batching and data parallelism do not change it.
Metrics, with TRL's names: ``loss`` (mean over pairs), ``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``pairs``
(per step), ``packing_efficiency``.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_seed.config.schema import ConfigError
from megatron_seed.data.packing import PackedSFTDataset, build_row
from megatron_seed.models.masks import segment_ids_to_attention_mask
from megatron_seed.training.forward_only import forward_only
from megatron_seed.training.objective import TOKENS, Objective, builds
from megatron_seed.training.objectives.common import (build_reference_chunks, collate_rows, objective_cache_dir,
                                                      on_rank0_first, packed_micro_batches, run_chat_tokenizer)


class PackedPairDataset(PackedSFTDataset):
    """Rows of whole pairs (``data`` is a :class:`~megatron_seed.data.preference_data.PairData`:
    ``lengths`` per pair, ``pair(j)`` its chosen and rejected samples). Each row also carries
    ``pair_index`` (``seq_length // 2`` slots, -1 unused): the data-set index of its k-th pair."""

    def row(self, epoch: int, i: int) -> dict[str, np.ndarray]:
        return self.build(self.plan(epoch).rows[i])

    def build(self, pairs) -> dict[str, np.ndarray]:
        samples = [s for j in pairs for s in self.data.pair(int(j))]
        row = build_row(samples, self.seq_length, self.pad_id)
        index = np.full(self.seq_length // 2, -1, dtype=np.int64)
        index[:len(pairs)] = np.asarray(pairs, dtype=np.int64)
        row["pair_index"] = index
        return row


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor,
                   pair_index: torch.Tensor):
    """Per pair of the micro-batch: (chosen log-prob, rejected log-prob, chosen and rejected
    completion tokens, data-set index), each flattened over the rows' used pair slots."""
    b, s = loss_mask.shape
    slots = pair_index.shape[1]
    logp = -per_token_loss.float().reshape(b, s) * loss_mask.float()
    segments = torch.zeros(b, 2 * slots + 1, dtype=logp.dtype, device=logp.device)
    segments.scatter_add_(1, segment_ids.long(), logp)
    tokens = torch.zeros(b, 2 * slots + 1, dtype=logp.dtype, device=logp.device)
    tokens.scatter_add_(1, segment_ids.long(), loss_mask.float())
    used = pair_index >= 0
    return (segments[:, 1::2][used], segments[:, 2::2][used], tokens[:, 1::2][used], tokens[:, 2::2][used],
            pair_index[used])


class DPOObjective(Objective):
    name = "dpo"
    loss_key = "dpo loss"
    metric_keys = ("dpo loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                   "logps/chosen", "logps/rejected", "pairs", "packing_efficiency")
    sum_keys = ("pairs",)
    loss_normalization = "per_token"  # the unit is a pair: loss = sum over pairs / pairs in the global batch
    # needs: the defaults (data.train pairs or else token data checked; its loss sums log-probs per
    # sequence, so no context parallelism)

    @classmethod
    def check_config(cls, run) -> None:
        if run.ref.mode == "live" and run.parallel.pipeline > 1:
            raise ConfigError("ref.mode=live needs parallel.pipeline=1; use ref.mode=precomputed (the default) "
                              "with pipeline parallelism")

    def __init__(self, datasets: list, ref_logps: list, dpo, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device, reference: str, ref_chunk=None):
        self.datasets = datasets  # [train, valid]: PackedPairDataset or None
        self.ref_logps = ref_logps  # per split: float64 tensor [pairs, 2] (precomputed) or None (live)
        self.dpo, self.ref_chunk = dpo, ref_chunk
        self.reference = reference  # the reference checkpoint (resolved iteration directory)
        self.micro_batch_size, self.dp_rank, self.dp_size, self.device = micro_batch_size, dp_rank, dp_size, device
        self._split = 0

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        pass  # the reference was read from the checkpoint before this objective was built

    def data_iterator(self, split: int, consumed_samples: int) -> Optional[Iterator[dict]]:
        dataset = self.datasets[split] if split < len(self.datasets) else None
        if dataset is None:
            return None
        return _tagged(packed_micro_batches(dataset, consumed_samples, self.micro_batch_size, self.dp_rank,
                                            self.dp_size, self.device), split)

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        mask = segment_ids_to_attention_mask(batch["segment_ids"])
        args = (batch["tokens"], batch["position_ids"], mask)
        output = model(*args, labels=batch["labels"])
        ref = None
        if self.ref_chunk is not None:
            with torch.no_grad():
                ref = self.ref_chunk(*args, labels=batch["labels"])
        table = self.ref_logps[batch["split"]] if self.ref_chunk is None else None
        return output, partial(self.loss, batch, ref, table)

    def loss(self, batch: dict, ref_per_token: Optional[torch.Tensor], table: Optional[torch.Tensor],
             per_token_loss: torch.Tensor):
        from megatron_seed.training.objectives.dpo_loss import dpo_losses, dpo_metrics, sft_term

        chosen, rejected, chosen_tokens, rejected_tokens, index = sequence_logps(
            per_token_loss, batch["loss_mask"], batch["segment_ids"], batch["pair_index"])
        if ref_per_token is not None:
            ref_chosen, ref_rejected, _, _, _ = sequence_logps(
                ref_per_token, batch["loss_mask"], batch["segment_ids"], batch["pair_index"])
        else:
            ref = table[index.cpu()].to(chosen.device, chosen.dtype)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        d = self.dpo
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            chosen, rejected, ref_chosen, ref_rejected, beta=d.beta, loss_type=d.loss_type,
            label_smoothing=d.label_smoothing, chosen_token_counts=chosen_tokens,
            rejected_token_counts=rejected_tokens)
        if d.sft_weight:
            losses = losses + d.sft_weight * sft_term(chosen, chosen_tokens)
        pairs = torch.tensor(float(len(losses)), dtype=torch.float32, device=losses.device)
        loss_sum = losses.sum()
        real = batch["segment_ids"] > 0
        report = {self.loss_key: torch.stack([loss_sum.detach(), pairs]),
                  "pairs": torch.stack([pairs, torch.ones_like(pairs)]),
                  "packing_efficiency": torch.tensor([float(real.sum()), float(real.numel())], dtype=torch.float64),
                  TOKENS: torch.tensor([float(real.sum()), float(real.shape[0])], dtype=torch.float64)}
        for key, values in dpo_metrics(chosen.detach(), rejected.detach(), chosen_rewards, rejected_rewards).items():
            report[key] = torch.stack([values.sum().float(), pairs])
        return loss_sum, pairs.to(torch.int), report


def _tagged(batches, split: int):
    """The split rides along in each batch: the loss looks reference log-probs up per split."""
    for batch in batches:
        batch["split"] = split
        yield batch


# ---------------------------------------------------------------------------------------------
# reference log-probs


def reference_cache_path(cache_dir: str, data_keys: list[str], ref_checkpoint: str, precision: str) -> str:
    """Where a reference's log-probs for these pair sets live: the key covers the pairs, the
    reference checkpoint (its resolved iteration directory and metadata time) and the precision."""
    stat = os.stat(os.path.join(ref_checkpoint, "metadata.json")) if os.path.isdir(ref_checkpoint) else None
    payload = {"pairs": data_keys, "ref": os.path.abspath(ref_checkpoint),
               "ref_mtime": stat.st_mtime_ns if stat else None, "precision": precision}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"dpo-ref-{key}.npy")


@torch.no_grad()
def compute_reference_logps(run, ctx, chunks: list, dataset: PackedPairDataset, num_pairs: int) -> np.ndarray:
    """``[num_pairs, 2]`` float64 (chosen, rejected) reference log-probs from one forward-only pass
    of megatron-core's schedule: rows of whole pairs (epoch 0's packing), dealt round-robin to the
    data-parallel ranks, padded with empty rows to equal micro-batch counts; the last pipeline
    stage collects, data-parallel ranks gather, the last stage broadcasts down the pipeline."""
    from megatron.core import parallel_state

    mbs = run.train.micro_batch_size
    rows = list(dataset.plan(0).rows)
    per_rank = -(-len(rows) // (mbs * ctx.dp)) * mbs  # rows per rank, whole micro-batches
    mine = [rows[i] for i in range(ctx.dp_rank, len(rows), ctx.dp)]
    mine += [np.zeros(0, dtype=np.int64)] * (per_rank - len(mine))

    def batches():
        for lo in range(0, per_rank, mbs):
            yield collate_rows([dataset.build(r) for r in mine[lo:lo + mbs]], ctx.device)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], segment_ids_to_attention_mask(batch["segment_ids"]),
                       labels=batch["labels"])

        def collect(per_token_loss):  # (data-set indices, chosen, rejected) of the micro-batch's pairs
            chosen, rejected, _, _, index = sequence_logps(per_token_loss, batch["loss_mask"], batch["segment_ids"],
                                                        batch["pair_index"])
            one = torch.ones((), device=per_token_loss.device)
            return (per_token_loss.sum() * 0, one.to(torch.int),
                    (index.cpu().numpy(), chosen.double().cpu().numpy(), rejected.double().cpu().numpy()))

        return output, collect

    collected = forward_only(run, chunks, forward_step, [batches() for _ in chunks], per_rank // mbs)
    gathered: list = [None] * ctx.dp
    torch.distributed.all_gather_object(gathered, collected, group=parallel_state.get_data_parallel_group())
    box = [gathered]
    torch.distributed.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                            group=parallel_state.get_pipeline_model_parallel_group())
    out = np.full((num_pairs, 2), np.nan)
    for part in box[0]:
        for index, chosen, rejected in part:
            out[index, 0], out[index, 1] = chosen, rejected
    missing = np.isnan(out).any(axis=1)
    if missing.any():  # a bug in the row dealing, never a data issue
        raise AssertionError(f"reference pass left {int(missing.sum())} of {num_pairs} pairs without log-probs")
    return out


def resumed_reference(train) -> Optional[str]:
    """When a DPO run resumes from its own checkpoint, the reference stays the one it started with
    (recorded in the objective state), not the checkpoint it resumes from."""
    from megatron_seed.checkpoint.checkpointer import read_train_state

    if not train.load or train.finetune:
        return None
    _, saved = read_train_state(train.load)
    objective = saved.objective or {}
    return (objective.get("state") or {}).get("reference") if objective.get("name") == "dpo" else None


@builds(DPOObjective)
def build_dpo_objective(run, ctx, tokenizer) -> DPOObjective:
    """Pairs tokenized (rank 0 first, then the others from the cache), reference log-probs computed
    once or read from the cache (``ref.mode=precomputed``), or a reference model kept (``live``)."""
    from megatron_seed.data.preference_data import build_pair_data

    d, t = run.data, run.train
    if not d.train:
        raise ConfigError("the dpo objective needs data.train=FILE (jsonl, jsonl.gz or parquet pairs with "
                          "prompt, chosen, rejected)")
    ref_load = run.ref.load or resumed_reference(t) or t.load
    if not ref_load:
        raise ConfigError("DPO needs a reference model: set train.load=CKPT (the policy's start, also the "
                          "default reference) or ref.load=CKPT")
    chat = run_chat_tokenizer(run)  # (ref.mode=live with pipeline stages: DPOObjective.check_config)
    cache = objective_cache_dir(run, "dpo")
    datasets, pair_data = [], []
    for split in (d.train, d.valid):
        if not split:
            datasets.append(None)
            pair_data.append(None)
            continue
        build = partial(build_pair_data, [split], chat, cache, d.seq_length, overflow=d.overflow)
        data = on_rank0_first(build, ctx)
        if ctx.is_main:
            print(f"[dpo] {split}: {data.summary.line()}", flush=True)
        pair_data.append(data)
        datasets.append(PackedPairDataset(data, d.seq_length, chat.pad_id, t.seed, packing=d.packing))

    from megatron_seed.checkpoint.layout import latest_checkpoint

    resolved = latest_checkpoint(ref_load)
    if resolved is None:
        raise ConfigError(f"ref.load/train.load={ref_load}: no complete checkpoint there")
    if run.ref.mode == "live":
        ref_chunks = build_reference_chunks(run, ctx, ref_load)
        return DPOObjective(datasets, [None, None], run.dpo, t.micro_batch_size, ctx.dp_rank, ctx.dp, ctx.device,
                            os.path.abspath(resolved), ref_chunk=ref_chunks[0])
    path = reference_cache_path(cache, [p.summary.key for p in pair_data if p is not None], resolved,
                                t.precision)
    if not os.path.exists(path):
        ref_chunks = build_reference_chunks(run, ctx, ref_load)
        if ctx.is_main:
            print(f"[dpo] reference log-probs from {resolved}: one forward pass over "
                  f"{sum(len(p) for p in pair_data if p is not None)} pairs", flush=True)
        tables = [compute_reference_logps(run, ctx, ref_chunks, ds, len(p)) if ds is not None else np.zeros((0, 2))
                  for ds, p in zip(datasets, pair_data)]
        del ref_chunks
        if ctx.rank == 0:
            tmp = f"{path}.tmp-{os.getpid()}.npy"
            np.save(tmp, np.concatenate(tables))
            os.replace(tmp, path)
        torch.distributed.barrier()
    elif ctx.is_main:
        print(f"[dpo] reference log-probs reused from {path}", flush=True)
    table = torch.from_numpy(np.load(path))
    sizes = [len(p) if p is not None else 0 for p in pair_data]
    if len(table) != sum(sizes):
        raise ValueError(f"{path} holds {len(table)} pairs' reference log-probs, the data has {sum(sizes)}; "
                         "delete the file to recompute it")
    ref_tables = [table[:sizes[0]], table[sizes[0]:]]
    return DPOObjective(datasets, ref_tables, run.dpo, t.micro_batch_size, ctx.dp_rank, ctx.dp, ctx.device,
                        os.path.abspath(resolved))
