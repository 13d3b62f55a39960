"""RMSNorm, forward and backward, including the weight gradient.

    y = x / sqrt(mean(x^2) + eps) * weight

Forward keeps ``rstd`` (one float32 per row) for backward. Backward, with ``x_hat = x * rstd`` and
``g = dy * weight``:

    dx = rstd * (g - x_hat * mean(g * x_hat))      dweight = sum over rows of dy * x_hat

Each program handles a block of whole rows (the row is one tile: hidden sizes up to a few
thousand), writes its partial ``dweight`` to a [programs, hidden] float32 buffer, and torch sums
it: no atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_seed_kernels._common import check_device, next_power_of_2, rows_per_program


@triton.jit
def _rms_norm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, eps,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_COLS)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < cols)[None, :]
    offsets = row[:, None] * cols + col[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < cols, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, axis=1) / cols
    rstd = 1.0 / tl.sqrt(mean_square + tl.cast(eps, tl.float32))
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def _rms_norm_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, cols,
                       BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    pid = tl.program_id(0)
    row = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_COLS)
    row_ok = row < rows
    col_ok = col < cols
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = row[:, None] * cols + col[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
    x_hat = x * rstd[:, None]
    g = dy * w[None, :]
    dot = tl.sum(g * x_hat, axis=1) / cols
    dx = rstd[:, None] * (g - x_hat * dot[:, None])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * cols + col, tl.sum(dy * x_hat, axis=0), mask=col_ok)


def _launch_shape(rows: int, cols: int):
    block_cols = next_power_of_2(cols)
    block_rows = rows_per_program(cols)
    return block_rows, block_cols, triton.cdiv(rows, block_rows)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        check_device(x, weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, cols = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_rows, block_cols, programs = _launch_shape(rows, cols)
        _rms_norm_forward[(programs,)](x2, weight.contiguous(), y, rstd, rows, cols, float(eps),
                                       BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        block_rows, block_cols, programs = _launch_shape(rows, cols)
        dw_partial = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        _rms_norm_backward[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial, rows, cols,
                                        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape), output in ``x``'s dtype."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: last dimension of x ({x.shape[-1]}) != weight size ({weight.shape[0]})")
    return _RMSNorm.apply(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain torch, float32 inside, output in ``x``'s dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)
