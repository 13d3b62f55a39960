"""Packing whole SFT samples into fixed-length rows, and the attention layouts for packed rows.

Per epoch the sample order is shuffled with ``(seed, epoch)``, then samples are placed
best-fit-decreasing: longest first (ties in shuffled order), each into the open row with the least
room that still fits it, a new row when none does. BFD leaves fewer, fuller rows than filling rows
in arrival order, and no sample is ever cut or split across rows, so every sample is seen exactly
once per epoch with its whole context. The finished rows are shuffled again with the same
generator so that batches are not sorted by length. ``packing=False`` gives one sample per row.

A row of ``seq_length`` slots (:func:`build_row`) holds, for samples placed back to back then
padding:

    tokens        the ids, ``pad_id`` on padding
    labels        ``labels[t] = tokens[t+1]`` inside a sample; at a sample's last token and on
                  padding ``pad_id`` (a valid id, so a vocabulary-parallel loss can index it)
    loss_mask     float32; 1 where ``labels[t]`` is a trained token, so 0 on prompts, padding and
                  the last token of every sample (its successor belongs to another sample)
    position_ids  0, 1, ... restarting in every sample (and in the padding)
    segment_ids   1, 2, ... per sample, 0 on padding

``segment_ids`` give megatron-core's ``[b, 1, s, s]`` boolean mask (True = masked out; block-
diagonal causal, :func:`megatron_seed.models.masks.segment_ids_to_attention_mask`) or Transformer
Engine's THD ``cu_seqlens`` (:func:`segment_ids_to_cu_seqlens`). Padding is a sequence of its own in both, so no query row is
fully masked (a softmax over nothing is NaN) and THD covers every token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

from megatron_seed.models.masks import segment_ids_to_attention_mask


class SampleSource(Protocol):
    """What packing reads: :class:`~megatron_seed.data.sft_data.SFTData` is one."""

    @property
    def lengths(self) -> np.ndarray: ...

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class PackPlan:
    """One epoch's rows, each an array of sample indices, and how full they are."""

    rows: tuple[np.ndarray, ...]
    seq_length: int
    real_tokens: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def efficiency(self) -> float:
        """Real tokens / slots (``num_rows * seq_length``); 1.0 means no padding."""
        return self.real_tokens / (self.num_rows * self.seq_length) if self.rows else 0.0


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int,
                        order: Optional[np.ndarray] = None) -> list[list[int]]:
    """Bins of sample indices, none holding more than ``capacity`` tokens. Samples are taken
    longest first, ties in ``order`` (default: index order); each goes into the open bin with the
    least room that fits it (ties: the oldest bin). O(n log n) plus list inserts."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.arange(len(lengths)) if order is None else np.asarray(order)
    if len(lengths) and lengths.max() > capacity:
        i = int(np.argmax(lengths))
        raise ValueError(f"sample {i} has {int(lengths[i])} tokens, more than a row of {capacity}")
    if len(lengths) and lengths.min() < 1:
        raise ValueError(f"sample {int(np.argmin(lengths))} is empty")
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free slots, bin id) of open bins, sorted
    for i in by_length.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(room, (need, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - need > 0:
            bisect.insort(room, (free - need, b))
    return bins


def plan_epoch(lengths: Sequence[int] | np.ndarray, seq_length: int, seed: int, epoch: int,
               packing: bool = True) -> PackPlan:
    """The rows of one epoch: every sample exactly once; deterministic in ``(seed, epoch)``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if packing:
        rows = [np.asarray(r, dtype=np.int64) for r in best_fit_decreasing(lengths, seq_length, order)]
        rows = [rows[k] for k in rng.permutation(len(rows))]
    else:
        if len(lengths) and lengths.max() > seq_length:
            i = int(np.argmax(lengths))
            raise ValueError(f"sample {i} has {int(lengths[i])} tokens, more than a row of {seq_length}")
        rows = [np.array([i], dtype=np.int64) for i in order]
    return PackPlan(tuple(rows), seq_length, int(lengths.sum()))


def build_row(samples: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row (see the module docstring) from ``(ids, loss_mask)`` pairs, the mask per token
    marking trained target tokens (what :mod:`~megatron_seed.data.chat` produces)."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    segment_ids = np.zeros(seq_length, dtype=np.int32)
    pos = 0
    for k, (ids, mask) in enumerate(samples, start=1):
        n = len(ids)
        if len(mask) != n:
            raise ValueError(f"sample {k - 1} of the row has {n} ids but {len(mask)} mask values")
        if pos + n > seq_length:
            raise ValueError(f"samples of {sum(len(s[0]) for s in samples)} tokens overflow a row of {seq_length}")
        tokens[pos:pos + n] = ids
        labels[pos:pos + n - 1] = ids[1:]
        loss_mask[pos:pos + n - 1] = np.asarray(mask[1:], dtype=np.float32)  # target t+1 trained -> loss at t
        position_ids[pos:pos + n] = np.arange(n)
        segment_ids[pos:pos + n] = k
        pos += n
    position_ids[pos:] = np.arange(seq_length - pos)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "segment_ids": segment_ids}


def collate(rows: Sequence[dict[str, np.ndarray]]):
    """Rows -> a batch of torch tensors ``[b, seq_length]`` under the same keys."""
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def attention_mask_for(batch: dict):
    """The mask a packed micro-batch hands the model: the dense block-diagonal causal mask, or,
    when the rows are split across context-parallel ranks (the trainer marks such batches), the
    segment ids themselves, from which the ring attention masks each block by global position."""
    if batch.get("context_parallel"):
        return batch["segment_ids"]
    return segment_ids_to_attention_mask(batch["segment_ids"])


def segment_ids_to_cu_seqlens(segment_ids):
    """``[b, s]`` segment ids -> (``cu_seqlens`` int32 ``[n + 1]``, ``max_seqlen``) over the
    flattened batch, as Transformer Engine's THD format takes them; a sequence is a run of equal
    segment ids inside a row (the padding run included, so the sequences cover every token)."""
    import torch

    b, s = segment_ids.shape
    change = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).flatten()
    cu = torch.cat([starts, starts.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0


def packed_seq_params_for(segment_ids):
    """megatron-core's ``PackedSeqParams`` in THD format for rows of packed sequences, the
    ``[b, s]`` micro-batch flattened to one ``[1, b * s]`` row: what Transformer Engine's attention
    (and RoPE, restarted per sequence) needs, since TE's causal attention ignores a dense mask."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = segment_ids_to_cu_seqlens(segment_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


class PackedSFTDataset:
    """Rows of packed samples for one epoch at a time: ``num_rows(epoch)``, ``row(epoch, i)``.

    ``data`` is any :class:`SampleSource`; the plan of the most recent epoch is kept."""

    def __init__(self, data: SampleSource, seq_length: int, pad_id: int, seed: int, packing: bool = True):
        self.data, self.seq_length, self.pad_id = data, seq_length, pad_id
        self.seed, self.packing = seed, packing
        self._plan: Optional[tuple[int, PackPlan]] = None

    def plan(self, epoch: int) -> PackPlan:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_epoch(self.data.lengths, self.seq_length, self.seed, epoch, self.packing))
        return self._plan[1]

    def num_rows(self, epoch: int) -> int:
        return self.plan(epoch).num_rows

    def row(self, epoch: int, i: int) -> dict[str, np.ndarray]:
        indices = self.plan(epoch).rows[i]
        return build_row([self.data.sample(int(j)) for j in indices], self.seq_length, self.pad_id)
