"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T`` without the [tokens, vocab] logits.

The tokens are walked in chunks. Per chunk: the logits are one matmul (cuBLAS), a Triton kernel
reduces each row to its max, sum of exponentials and target logit (online softmax over vocab
blocks), and a second one overwrites the logits in place with their gradient
``(softmax - onehot(label)) * row_scale``; two more matmuls turn that into the chunk's
``d hidden`` and its share of ``d weight``. So at most one chunk of logits exists at a time: chunks
are sized so that a chunk's logits are about as large as the hidden states.

Gradients are computed in the forward pass (like Liger-Kernel's), for a gradient of 1 on every
counted token; backward scales them, which is exact whenever the incoming gradient is the same on
every counted token: the mean loss, and the masked sum megatron-style objectives take once masked
positions are labelled ``ignore_index``. For any other incoming gradient backward recomputes the
chunks with it (one more matmul per chunk), so results are exact either way.

Vocab-parallel (tensor parallelism, like megatron-core's ``vocab_parallel_cross_entropy``):
``weight`` is this rank's vocabulary slice [vocab / tp, hidden] (rank r holds ids
[r * vocab / tp, (r + 1) * vocab / tp)) and ``hidden`` the full (gathered) tokens; the row max,
sum of exponentials and target logit are all-reduced over ``tp_group``; the returned ``d hidden``
is this rank's partial sum, which the caller all-reduces (megatron-core's
``copy_to_tensor_model_parallel_region`` does it in its backward).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron_seed_kernels._common import check_device, next_power_of_2, rows_per_program

IGNORE_INDEX = -100


@triton.jit
def _row_stats(logits_ptr, labels_ptr, max_ptr, sum_exp_ptr, target_ptr, rows, vocab,
               BLOCK_ROWS: tl.constexpr, BLOCK_VOCAB: tl.constexpr):
    """Per row: max, sum(exp(x - max)) and the logit at the (local) label, or 0 if it is elsewhere."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    label = tl.load(labels_ptr + row, mask=row_ok, other=-1)
    running_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    target = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, vocab, BLOCK_VOCAB):
        col = start + tl.arange(0, BLOCK_VOCAB)
        mask = row_ok[:, None] & (col < vocab)[None, :]
        x = tl.load(logits_ptr + row[:, None] * vocab + col[None, :], mask=mask,
                    other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Rows past the end stay at -inf: keep their arithmetic finite.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
        running_max = new_max
        target += tl.sum(tl.where(col[None, :] == label[:, None], x, 0.0), axis=1)
    tl.store(max_ptr + row, running_max, mask=row_ok)
    tl.store(sum_exp_ptr + row, running_sum, mask=row_ok)
    tl.store(target_ptr + row, target, mask=row_ok)


@triton.jit
def _logits_to_grad(logits_ptr, labels_ptr, lse_ptr, scale_ptr, rows, vocab,
                    BLOCK_ROWS: tl.constexpr, BLOCK_VOCAB: tl.constexpr):
    """In place: logits -> (exp(logit - lse) - [col == label]) * scale, per row."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_VOCAB + tl.arange(0, BLOCK_VOCAB)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < vocab)[None, :]
    label = tl.load(labels_ptr + row, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + row, mask=row_ok, other=0.0)
    offsets = row[:, None] * vocab + col[None, :]
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.exp(x - lse[:, None]) - tl.where(col[None, :] == label[:, None], 1.0, 0.0)
    tl.store(logits_ptr + offsets, (grad * scale[:, None]).to(logits_ptr.dtype.element_ty), mask=mask)


def _default_chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Chunk logits about the size of the hidden states (Liger-Kernel's rule), a power of two."""
    return next_power_of_2(triton.cdiv(rows, max(1, triton.cdiv(vocab, hidden))))


def _local_labels(labels: torch.Tensor, vocab_local: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels in this rank's slice, -1 elsewhere; counted = label != ignore_index)."""
    counted = labels != IGNORE_INDEX
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    start = (dist.get_rank(tp_group) if tp > 1 else 0) * vocab_local
    local = labels - start
    in_slice = counted & (local >= 0) & (local < vocab_local)
    return torch.where(in_slice, local, torch.full_like(local, -1)).to(torch.int32).contiguous(), counted


def _chunked_pass(hidden, weight, local_labels, counted, row_scale, tp_group, chunk_rows, want_grads,
                  want_loss=True, accum_dtype=None):
    """One walk over the token chunks: per-token loss (float32) and, if asked, d hidden and d weight
    for ``row_scale`` as the incoming per-token gradient."""
    rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    loss = torch.zeros(rows, dtype=torch.float32, device=hidden.device) if want_loss else None
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    # d weight accumulates over the chunks in place, by default in the weight's dtype (as Liger-Kernel
    # does: no extra weight-sized buffer); accum_dtype=torch.float32 rounds once, at the end.
    grad_weight = torch.zeros(vocab, hidden_size, dtype=accum_dtype or weight.dtype,
                              device=hidden.device) if want_grads else None
    block_vocab = min(next_power_of_2(vocab), 4096)
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        n = b - a
        logits = hidden[a:b] @ weight.t()  # [n, vocab], hidden's dtype, float32 accumulation in the GEMM
        labels_c = local_labels[a:b]
        row_max = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sum_exp = torch.empty_like(row_max)
        target = torch.empty_like(row_max)
        block_rows = rows_per_program(block_vocab)
        _row_stats[(triton.cdiv(n, block_rows),)](logits, labels_c, row_max, sum_exp, target, n, vocab,
                                                   BLOCK_ROWS=block_rows, BLOCK_VOCAB=block_vocab)
        if tp > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            sums = torch.stack([sum_exp * torch.exp(row_max - global_max), target])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
            row_max, sum_exp, target = global_max, sums[0], sums[1]
        lse = row_max + torch.log(sum_exp)
        if want_loss:
            loss[a:b] = torch.where(counted[a:b], lse - target, 0.0)
        if not want_grads:
            continue
        scale = torch.where(counted[a:b], row_scale[a:b].float(), 0.0).contiguous()
        _logits_to_grad[(triton.cdiv(n, block_rows), triton.cdiv(vocab, block_vocab))](
            logits, labels_c, lse.contiguous(), scale, n, vocab, BLOCK_ROWS=block_rows, BLOCK_VOCAB=block_vocab)
        torch.matmul(logits, weight, out=grad_hidden[a:b])
        if grad_weight.dtype == logits.dtype:
            grad_weight.addmm_(logits.t(), hidden[a:b])
        else:  # a wider accumulator: add vocab slices, so the temporary stays small
            for v in range(0, vocab, 8192):
                grad_weight[v:v + 8192] += logits[:, v:v + 8192].t() @ hidden[a:b]
    return loss, grad_hidden, grad_weight


def _uniform_counted_gradient(g: torch.Tensor, counted: torch.Tensor) -> Optional[torch.Tensor]:
    """The incoming gradient's one value on the counted tokens (0 if there are none), or None if it
    differs between them: then the forward-time gradients cannot be reused. One host sync."""
    counted_g = g[counted]
    if counted_g.numel() == 0:
        return torch.zeros((), device=g.device)
    return counted_g[0] if bool((counted_g == counted_g[0]).all()) else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, chunk_rows, want_grads, accum_dtype):
        check_device(hidden, weight)
        rows, hidden_size = hidden.shape
        if rows == 0:
            raise ValueError("linear_cross_entropy: no tokens")
        chunk_rows = chunk_rows or _default_chunk_rows(rows, hidden_size, weight.shape[0])
        local_labels, counted = _local_labels(labels, weight.shape[0], tp_group)
        ones = torch.ones(rows, dtype=torch.float32, device=hidden.device)
        loss, grad_hidden, grad_weight = _chunked_pass(hidden, weight, local_labels, counted, ones, tp_group,
                                                       chunk_rows, want_grads, accum_dtype=accum_dtype)
        ctx.save_for_backward(hidden, weight, local_labels, counted, grad_hidden, grad_weight)
        ctx.tp_group, ctx.chunk_rows, ctx.accum_dtype = tp_group, chunk_rows, accum_dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_labels, counted, grad_hidden, grad_weight = ctx.saved_tensors
        g = grad_loss.float()
        scale = _uniform_counted_gradient(g, counted)
        if scale is not None:
            if ctx.consumed:
                raise RuntimeError("linear_cross_entropy: backward ran twice; its saved gradients are scaled in "
                                   "place (they are as large as the weight), so retain_graph is not supported")
            ctx.consumed = True
            # In place: one rounding of the exact product, as out of place, without a copy.
            return grad_hidden.mul_(scale), grad_weight.mul_(scale).to(weight.dtype), None, None, None, None, None
        _, d_hidden, d_weight = _chunked_pass(hidden, weight, local_labels, counted, g, ctx.tp_group,
                                              ctx.chunk_rows, want_grads=True, want_loss=False,
                                              accum_dtype=ctx.accum_dtype)
        return d_hidden, d_weight.to(weight.dtype), None, None, None, None, None


def linear_cross_entropy_per_token(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   tp_group=None, chunk_rows: Optional[int] = None,
                                   accum_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per-token loss [tokens] (float32; 0 where the label is ``ignore_index`` = -100) of
    ``hidden [tokens, hidden] @ weight.T`` (``weight`` [vocab or vocab / tp, hidden]).
    ``accum_dtype``: the weight gradient's accumulator over chunks (default: the weight's dtype)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [tokens, h] and weight "
                         f"{tuple(weight.shape)} [vocab, h] with the same h")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be [tokens] = [{hidden.shape[0]}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    # Gradients are made in forward, so forward must know whether any will be asked for (under
    # no_grad, e.g. evaluation, only the loss is computed).
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(), tp_group,
                                     chunk_rows, want_grads, accum_dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, tp_group=None, chunk_rows: Optional[int] = None,
                         accum_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not ``ignore_index`` (0 if there are none).

    ``hidden`` [..., h], ``weight`` [vocab, h] (or this rank's vocab slice with ``tp_group``),
    ``labels`` [...]."""
    flat_labels = labels.reshape(-1)
    if ignore_index != IGNORE_INDEX:
        flat_labels = torch.where(flat_labels == ignore_index, IGNORE_INDEX, flat_labels)
    per_token = linear_cross_entropy_per_token(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels,
                                               tp_group, chunk_rows, accum_dtype)
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / count


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = IGNORE_INDEX):
    """Plain torch: the full float32 logits and ``F.cross_entropy``."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    flat = labels.reshape(-1)
    if bool((flat == ignore_index).all()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits, flat, ignore_index=ignore_index)
