"""FP8 training: Transformer Engine's recipe on GPU, the same numerics emulated on CPU.

On a GPU with Transformer Engine, ``train.fp8`` turns on TE's FP8 GEMMs through megatron-core's
TransformerConfig (``fp8``, ``fp8_recipe="delayed"``, margin, amax history) - see
:func:`transformer_config_kwargs`. **That path needs CUDA + TE and is not exercised by the
CPU test suite.**

Without TE, :func:`enable_fp8_emulation` applies the recipe's numerics to megatron-core's local
linear layers from outside the model: the GEMM inputs (activations and weights) are quantized to
E4M3 and dequantized, and the gradient arriving at each GEMM output is quantized to E5M2
("hybrid") or E4M3, all with per-tensor *delayed scaling* as TE does it:

    scale = fp8_max / amax / 2**margin,  amax from the last ``amax_history_len`` steps
    ("max" of the history, or the "most_recent" entry); 1.0 before any history exists.

The matmul itself runs on the dequantized values in higher precision, which is what an FP8 GEMM
with fp32 accumulation computes (checked against ``torch._scaled_mm`` in the tests). It is for
studying numerics (loss curves, overflow, margins) on any machine, not for speed: torch has no
fast FP8 kernels on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass
class Fp8Recipe:
    """Transformer Engine's DelayedScaling, as megatron-core configures it."""

    format: Literal["hybrid", "e4m3"] = "hybrid"   # hybrid: E4M3 forward, E5M2 gradients
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: Literal["max", "most_recent"] = "most_recent"

    def validate(self) -> None:
        if self.format not in ("hybrid", "e4m3"):
            raise ValueError(f"fp8 format must be hybrid or e4m3, not {self.format!r}")
        if self.amax_history_len < 1 or self.margin < 0:
            raise ValueError("fp8 amax_history_len must be >= 1 and margin >= 0")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError("fp8 amax_compute_algo must be max or most_recent")

    @property
    def grad_dtype(self) -> torch.dtype:
        return FORMATS["e5m2" if self.format == "hybrid" else "e4m3"]


def transformer_config_kwargs(recipe: Fp8Recipe) -> dict:
    """megatron-core TransformerConfig fields for TE's delayed-scaling FP8 (GPU path)."""
    recipe.validate()
    return dict(fp8=recipe.format, fp8_recipe="delayed", fp8_margin=recipe.margin,
                fp8_amax_history_len=recipe.amax_history_len, fp8_amax_compute_algo=recipe.amax_compute_algo)


@dataclass
class ScalingState:
    """Delayed scaling of one tensor role (e.g. a layer's weight): the amax history."""

    dtype: torch.dtype
    recipe: Fp8Recipe
    history: list = field(default_factory=list)

    def scale(self) -> float:
        if not self.history:
            return 1.0
        amax = max(self.history) if self.recipe.amax_compute_algo == "max" else self.history[-1]
        if amax <= 0 or not torch.isfinite(torch.tensor(amax)):
            return 1.0
        return torch.finfo(self.dtype).max / amax / 2 ** self.recipe.margin

    def record(self, tensor: torch.Tensor) -> None:
        self.history.append(float(tensor.detach().abs().max()))
        del self.history[:-self.recipe.amax_history_len]


def quantize_dequantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as FP8 with per-tensor ``scale`` would represent it (saturating at the format's max)."""
    limit = torch.finfo(dtype).max
    q = (x.float() * scale).clamp(-limit, limit).to(dtype)
    return (q.float() / scale).to(x.dtype)


class _QuantizeForward(torch.autograd.Function):
    """Forward: FP8 quantize-dequantize with delayed scaling. Backward: pass the gradient on
    (TE's GEMM gradients are taken w.r.t. the high-precision tensors)."""

    @staticmethod
    def forward(ctx, x, state: ScalingState):
        out = quantize_dequantize(x, state.dtype, state.scale())
        state.record(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _QuantizeBackward(torch.autograd.Function):
    """Forward: identity. Backward: the incoming gradient quantized (E5M2 in hybrid)."""

    @staticmethod
    def forward(ctx, x, state: ScalingState):
        ctx.state = state
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        out = quantize_dequantize(grad, ctx.state.dtype, ctx.state.scale())
        ctx.state.record(grad)
        return out, None


class Fp8LinearEmulation:
    """Replaces a megatron-core linear layer's ``_forward_impl`` with its FP8-emulated version."""

    def __init__(self, module, recipe: Fp8Recipe):
        self.inner = module._forward_impl
        self.input = ScalingState(FORMATS["e4m3"], recipe)
        self.weight = ScalingState(FORMATS["e4m3"], recipe)
        self.grad = ScalingState(recipe.grad_dtype, recipe)

    def __call__(self, input, weight, *args, **kwargs):
        if not torch.is_grad_enabled():
            out = self.inner(quantize_dequantize(input, FORMATS["e4m3"], self.input.scale()),
                             quantize_dequantize(weight, FORMATS["e4m3"], self.weight.scale()), *args, **kwargs)
            return out
        out = self.inner(_QuantizeForward.apply(input, self.input), _QuantizeForward.apply(weight, self.weight),
                         *args, **kwargs)
        return _QuantizeBackward.apply(out, self.grad)


def enable_fp8_emulation(chunks: list, recipe: Optional[Fp8Recipe] = None) -> int:
    """Emulate FP8 in every megatron-core Column/RowParallelLinear of the model chunks (the
    output layer stays in high precision, as with TE). Returns the number of layers changed."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    recipe = recipe or Fp8Recipe()
    recipe.validate()
    count = 0
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and not name.endswith("output_layer"):
                module._forward_impl = Fp8LinearEmulation(module, recipe)
                count += 1
    return count
