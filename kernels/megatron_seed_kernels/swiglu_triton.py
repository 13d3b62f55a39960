"""SwiGLU, forward and backward: ``silu(gate) * up``.

    out = gate * sigmoid(gate) * up
    d_gate = d_out * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    d_up = d_out * silu(gate)

``gate`` and ``up`` may be the two halves of one fused fc1 output (row-strided views): the kernels
take row strides, so no copy is made to split them. Nothing but the inputs is kept for backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_seed_kernels._common import check_device, next_power_of_2, rows_per_program


@triton.jit
def _swiglu_forward(gate_ptr, up_ptr, out_ptr, rows, cols, gate_stride, up_stride,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    gate = tl.load(gate_ptr + row[:, None] * gate_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row[:, None] * up_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row[:, None] * cols + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(d_out_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, rows, cols, gate_stride, up_stride,
                     BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    dense = row[:, None] * cols + col[None, :]
    gate = tl.load(gate_ptr + row[:, None] * gate_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row[:, None] * up_stride + col[None, :], mask=mask, other=0.0).to(tl.float32)
    d_out = tl.load(d_out_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = d_out * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(d_gate_ptr + dense, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(d_up_ptr + dense, (d_out * silu).to(d_up_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[rows, cols] with unit column stride, as a view when possible (halves of a fused tensor)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dimensions not collapsible into one row stride
        return t.contiguous().view(-1, t.shape[-1])


def _grid(rows: int, cols: int):
    block_cols = min(next_power_of_2(cols), 1024)
    block_rows = rows_per_program(block_cols)
    return block_rows, block_cols, (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        check_device(gate, up)
        g2, u2 = _as_rows(gate), _as_rows(up)
        rows, cols = g2.shape
        out = torch.empty(rows, cols, dtype=gate.dtype, device=gate.device)
        block_rows, block_cols, grid = _grid(rows, cols)
        _swiglu_forward[grid](g2, u2, out, rows, cols, g2.stride(0), u2.stride(0),
                              BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, d_out):
        g2, u2 = ctx.saved_tensors
        rows, cols = g2.shape
        d_out2 = d_out.reshape(rows, cols).contiguous()
        d_gate = torch.empty(rows, cols, dtype=g2.dtype, device=g2.device)
        d_up = torch.empty(rows, cols, dtype=u2.dtype, device=u2.device)
        block_rows, block_cols, grid = _grid(rows, cols)
        _swiglu_backward[grid](d_out2, g2, u2, d_gate, d_up, rows, cols, g2.stride(0), u2.stride(0),
                               BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
        return d_gate.view(ctx.shape), d_up.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes), output in ``gate``'s dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return _SwiGLU.apply(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)
