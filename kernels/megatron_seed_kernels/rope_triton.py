"""Rotary position embedding on q and k in one launch (megatron-core's non-interleaved layout).

    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]

so with halves ``x1 = x[..., :d/2]``, ``x2 = x[..., d/2:]`` (and ``c1, c2, s1, s2`` the halves of
cos and sin):

    out1 = x1 * c1 - x2 * s1            out2 = x2 * c2 + x1 * s2
    dx1 = dout1 * c1 + dout2 * s2       dx2 = dout2 * c2 - dout1 * s1

q is [seq, batch, heads, head_dim], k is [seq, batch, kv_heads, head_dim] and cos / sin are
[seq, 1, 1, head_dim]: the rows (position, batch row, head) of q and of k are cut into blocks, and
one launch's programs take q's blocks first, then k's; each row reads its position's cos / sin.
Backward is the same kernel with the transposed rotation.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_seed_kernels._common import check_device, next_power_of_2, rows_per_program


@triton.jit
def _rotate_rows(x_ptr, out_ptr, cos_ptr, sin_ptr, block, rows, heads, batch, half, TRANSPOSE: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rows are (position, batch row, head) of one tensor; each gathers its position's cos / sin."""
    row = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_HALF)
    mask = (row < rows)[:, None] & (col < half)[None, :]
    position = row // (heads * batch)
    trig = position[:, None] * 2 * half + col[None, :]
    cos1 = tl.load(cos_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + trig + half, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + trig + half, mask=mask, other=0.0).to(tl.float32)
    base = row[:, None] * 2 * half + col[None, :]
    x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + half, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        out1 = x1 * cos1 + x2 * sin2
        out2 = x2 * cos2 - x1 * sin1
    else:
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
    tl.store(out_ptr + base, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + base + half, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, q_blocks, q_rows, k_rows, batch,
                 q_heads, k_heads, half, TRANSPOSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    """One launch for both tensors: the first ``q_blocks`` programs rotate q, the rest k."""
    pid = tl.program_id(0)
    if pid < q_blocks:
        _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr, pid, q_rows, q_heads, batch, half, TRANSPOSE,
                     BLOCK_ROWS, BLOCK_HALF)
    else:
        _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr, pid - q_blocks, k_rows, k_heads, batch, half,
                     TRANSPOSE, BLOCK_ROWS, BLOCK_HALF)


def _launch(q, k, cos, sin, transpose: bool):
    seq, batch, q_heads, dim = q.shape
    half = dim // 2
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k) if k is not None else None
    k_heads = k.shape[2] if k is not None else 1
    q_rows = seq * batch * q_heads
    k_rows = seq * batch * k_heads if k is not None else 0
    block_rows = rows_per_program(half)
    q_blocks = triton.cdiv(q_rows, block_rows)
    grid = (q_blocks + triton.cdiv(k_rows, block_rows),)
    _rope_kernel[grid](q, k if k is not None else q, q_out, k_out if k is not None else q_out, cos, sin,
                       q_blocks, q_rows, k_rows, batch, q_heads, k_heads, half, TRANSPOSE=transpose,
                       BLOCK_ROWS=block_rows, BLOCK_HALF=next_power_of_2(half))
    return q_out, k_out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.has_k = k is not None
        return _launch(q, k, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = dq.contiguous()
        dk = dk.contiguous() if ctx.has_k else None
        dq_in, dk_in = _launch(dq, dk, cos, sin, transpose=True)
        return dq_in, dk_in, None, None


def _check(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"apply_rope: q must be [seq, batch, heads, head_dim], got shape {tuple(q.shape)}")
    seq, batch, _, dim = q.shape
    if dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {dim}")
    if k is not None and (k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != dim):
        raise ValueError(f"apply_rope: k {tuple(k.shape)} must be [seq, batch, kv_heads, head_dim] like q {tuple(q.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.numel() != seq * dim or t.shape[0] != seq or t.shape[-1] != dim:
            raise ValueError(f"apply_rope: {name} must be [seq, 1, 1, head_dim] = [{seq}, 1, 1, {dim}], "
                             f"got {tuple(t.shape)}")


def apply_rope(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
    """``(x * cos + rotate_half(x) * sin)`` for q and k (k may be None), one launch; returns (q, k)."""
    _check(q, k, cos, sin)
    check_device(q, cos)
    q = q.contiguous()
    k = k.contiguous() if k is not None else None
    return _RoPE.apply(q, k, cos.contiguous(), sin.contiguous())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """Plain torch, float32 inside, outputs in the inputs' dtypes."""
    def one(x):
        xf = x.float()
        return (xf * cos.float() + _rotate_half(xf) * sin.float()).to(x.dtype)
    return one(q), (one(k) if k is not None else None)
