"""Context parallelism without Transformer Engine: megatron-core's sequence layout and a ring attention.

With ``parallel.context=N`` every sequence of a micro-batch is split across the N ranks of the
context-parallel group the way megatron-core splits it (``get_batch_on_this_cp_rank``): cut into
2N equal chunks, rank r holds chunks r and 2N-1-r. Under a causal mask early chunks attend to
little and late ones to much, so pairing chunk r with its mirror gives every rank the same work.
megatron-core itself slices the rotary embeddings that way (``get_pos_emb_on_this_cp_rank``) and
divides pipeline message shapes by N; what it leaves to the attention is the exchange of keys and
values, which Transformer Engine's ``DotProductAttention`` does on GPU (the TE spec).

For the local spec (CPU, or a GPU without TE) :class:`RingAttention` takes the core-attention slot:

* **forward**: the ranks pass their key/value blocks around the ring (send to r+1, receive from
  r-1, N-1 times, the next block's transfer overlapping this block's compute). Each query block is
  scored against every key block under the causal mask of their *global* positions, and the
  partial results are merged with the log-sum-exp trick (flash-attention's online softmax), so
  the full [S, S] score matrix never exists on one rank.
* **backward**: the key/value blocks go around the ring again, each carrying the gradient
  accumulated for it so far; after the last hop one more transfer returns each block's gradient
  to its owner. Probabilities are recomputed from the saved log-sum-exp (no [S, S] saved).
* grouped-query attention: query head i uses key/value group i // (heads / groups), as in
  megatron-core; the key/value gradients are summed over the heads sharing a group.

Computed in float32 whatever the input precision (the result is cast back). Masks: causal over
the whole row (pretraining), or block-diagonal causal over packed samples given by segment ids
(SFT rows), never a dense [S, S] mask. No attention dropout.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_seed.config.schema import ConfigError


def rank_positions(local_length: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions of the tokens rank ``cp_rank`` holds (chunks r and 2N-1-r)."""
    chunk = local_length // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


def split_sequence(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``tensor`` along its sequence dimension ``dim``."""
    length = tensor.shape[dim]
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not divisible by 2 x parallel.context = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


def context_parallel_batches(batches: Iterator[dict], cp_rank: int, cp_size: int) -> Iterator[dict]:
    """Micro-batches (dicts of [batch, seq, ...] tensors, the same on every rank of the group)
    cut to this rank's part of every sequence. Non-tensor entries pass through; ``context_parallel``
    is set, so that an objective hands attention segment ids instead of a dense mask
    (megatron_seed.data.packing.attention_mask_for)."""
    for batch in batches:
        part = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                try:
                    value = split_sequence(value, cp_rank, cp_size)
                except ValueError as err:
                    raise ValueError(f"batch[{key!r}]: {err}") from err
            part[key] = value
        part["context_parallel"] = True
        yield part


def _exchange(tensor: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Start sending ``tensor`` to the next rank of the ring and receiving the previous rank's."""
    rank, size = group.rank(), group.size()
    received = torch.empty_like(tensor)
    ops = [torch.distributed.P2POp(torch.distributed.isend, tensor,
                                   torch.distributed.get_global_rank(group, (rank + 1) % size), group),
           torch.distributed.P2POp(torch.distributed.irecv, received,
                                   torch.distributed.get_global_rank(group, (rank - 1) % size), group)]
    return received, torch.distributed.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, groups, s, d] -> [b, heads, s, d] (megatron-core's grouping: repeat_interleave)."""
    groups = kv.shape[1]
    return kv if groups == heads else kv.repeat_interleave(heads // groups, dim=1)


def _scores(q, k, q_pos, k_pos, scale, q_segments=None, k_segments=None):
    """Scaled scores of a query block against a key block, -inf where the causal mask of their
    global positions (and, for packed rows, different segments) forbids attention."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    masked = k_pos[None, :] > q_pos[:, None]
    if q_segments is not None:  # [b, s_q] and [b, s_k] -> [b, 1, s_q, s_k]
        masked = (masked[None] | (q_segments[:, :, None] != k_segments[:, None, :]))[:, None]
    return scores.masked_fill(masked, float("-inf"))


def _gather_segments(segments: Optional[torch.Tensor], group) -> Optional[list]:
    """Every rank's segment ids (a few integers per token: gathered once, not passed around)."""
    if segments is None:
        return None
    parts = [torch.empty_like(segments) for _ in range(group.size())]
    torch.distributed.all_gather(parts, segments.contiguous(), group=group)
    return parts


class _RingAttention(torch.autograd.Function):
    """q [b, heads, s, d]; k, v [b, groups, s, d]; causal over global positions; see the module
    docstring for the schedule."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, group, segments=None):
        rank, size = group.rank(), group.size()
        heads = q.shape[1]
        q32 = q.float()
        q_pos = rank_positions(q.shape[2], rank, size, q.device)
        all_segments = _gather_segments(segments, group)
        kv = torch.stack([k.float(), v.float()])
        out = lse = None
        for step in range(size):
            if step < size - 1:
                incoming, requests = _exchange(kv, group)
            source = (rank - step) % size
            k_pos = rank_positions(kv.shape[3], source, size, q.device)
            scores = _scores(q32, _expand(kv[0], heads), q_pos, k_pos, scale, segments,
                             None if all_segments is None else all_segments[source])
            block_lse = torch.logsumexp(scores, dim=-1)  # -inf on rows this block fully masks
            finite_lse = torch.where(torch.isinf(block_lse), torch.zeros_like(block_lse), block_lse)
            block_out = torch.matmul(torch.exp(scores - finite_lse[..., None]), _expand(kv[1], heads))
            if out is None:  # the rank's own block first: every row sees at least its own token
                out, lse = block_out, block_lse
            else:
                merged = torch.logaddexp(lse, block_lse)
                out = (out * torch.exp(lse - merged)[..., None]
                       + block_out * torch.exp(block_lse - merged)[..., None])
                lse = merged
            if step < size - 1:
                _wait(requests)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.group, ctx.segments, ctx.all_segments = scale, group, segments, all_segments
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale, group = ctx.scale, ctx.group
        rank, size = group.rank(), group.size()
        b, heads, s, d = q.shape
        groups = k.shape[1]
        q32, grad32 = q.float(), grad_out.float()
        q_pos = rank_positions(s, rank, size, q.device)
        delta = (grad32 * out).sum(-1, keepdim=True)  # rowsum(dO * O), flash-attention's D
        grad_q = torch.zeros_like(q32)
        # One buffer travels: this block's keys, values and the gradients gathered for them.
        travelling = torch.stack([k.float(), v.float(), torch.zeros_like(k, dtype=torch.float32),
                                  torch.zeros_like(v, dtype=torch.float32)])
        for step in range(size):
            kb, vb = _expand(travelling[0], heads), _expand(travelling[1], heads)
            source = (rank - step) % size
            k_pos = rank_positions(kb.shape[2], source, size, q.device)
            k_segments = None if ctx.all_segments is None else ctx.all_segments[source]
            probs = torch.exp(_scores(q32, kb, q_pos, k_pos, scale, ctx.segments, k_segments) - lse[..., None])
            grad_v = torch.matmul(probs.transpose(-1, -2), grad32)
            grad_scores = probs * (torch.matmul(grad32, vb.transpose(-1, -2)) - delta)
            grad_q += torch.matmul(grad_scores, kb) * scale
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), q32) * scale
            if groups != heads:  # heads sharing a key/value group add their gradients
                grad_k = grad_k.view(b, groups, heads // groups, -1, d).sum(2)
                grad_v = grad_v.view(b, groups, heads // groups, -1, d).sum(2)
            travelling[2] += grad_k
            travelling[3] += grad_v
            if step < size - 1:
                travelling, requests = _exchange(travelling, group)
                _wait(requests)
        grads = travelling[2:]
        if size > 1:  # each block's gradient is one hop from its owner
            grads, requests = _exchange(grads.contiguous(), group)
            _wait(requests)
        return grad_q.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group,
                   scale: Optional[float] = None, segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention over sequences split across ``group`` in megatron-core's context-parallel
    layout. q [b, heads, s_local, d], k and v [b, groups, s_local, d]; returns [b, heads, s_local, d].
    ``segments`` ([b, s_local] integers, this rank's part of each row's segment ids): packed rows,
    where a token attends only to earlier tokens of its own segment (block-diagonal causal)."""
    if q.shape[2] % 2:
        raise ValueError(f"the local sequence ({q.shape[2]} tokens) must hold two equal chunks")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value groups")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _RingAttention.apply(q, k, v, float(scale), group, segments)


class RingAttention(MegatronModule):
    """Core attention for the local spec under context parallelism: megatron-core's
    ``DotProductAttention`` signature, [s, b, heads, d] in, [s, b, heads * d] out."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ConfigError("parallel.context > 1 on the local spec needs model.attention_dropout=0 "
                              "(the ring attention has no dropout)")
        if attn_mask_type != AttnMaskType.causal:
            raise ConfigError(f"parallel.context > 1 on the local spec supports causal attention only, not {attn_mask_type}")
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # A mask here is a packed row's segment ids ([b, s_local] integers; see
        # megatron_seed.data.packing.attention_mask_for): a dense [s, s] mask would need the
        # whole sequence on every rank, which is what context parallelism avoids.
        segments = attention_mask
        if segments is not None and (segments.dim() != 2 or segments.is_floating_point() or segments.dtype == torch.bool):
            raise ValueError("context-parallel ring attention takes segment ids ([batch, local sequence] integers) "
                             f"as its mask, not a {tuple(segments.shape)} {segments.dtype} tensor")
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("context-parallel ring attention takes no attention bias or packed-sequence parameters")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        out = ring_attention(q, k, v, self.cp_group, self.softmax_scale, segments)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)
