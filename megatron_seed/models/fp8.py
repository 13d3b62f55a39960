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

The matmul itself runs on the dequantized values in the run's precision (bf16 or fp32: the
quantization is computed in fp32 either way), which is what an FP8 GEMM with fp32 accumulation
computes (checked against ``torch._scaled_mm`` in the tests). It is for studying numerics (loss
curves, overflow, margins) on any machine, not for speed: torch has no fast FP8 kernels on CPU.

The amax histories are model state: each emulated layer keeps them in its ``_extra_state``, which
megatron-core's ``sharded_state_dict`` saves as a ShardedObject, so a run resumes with the scales
it stopped with. Histories differ per tensor/data-parallel rank (each sees its own weight shard
and micro-batches); each layer's object holds every rank's histories (gathered when the sharded
state dict is built) under one layout-independent key. A rank loading at the same layout takes its
own; at another layout each rank takes the element-wise max over the saved ranks, which is the
amax a TP/DP-reduced history (as Transformer Engine keeps) would have had.
"""

from __future__ import annotations

import functools
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


ROLES = ("input", "weight", "grad")
EXTRA_STATE_FORMAT = "megatron_seed.fp8_emulation/1"


def _parallel_place() -> tuple[tuple[int, int], tuple[int, int]]:
    """((tp size, dp size), (tp rank, dp rank)) of this process; context parallel counts as data
    parallel (its ranks see different tokens)."""
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        return (1, 1), (0, 0)
    return ((ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size(with_context_parallel=True)),
            (ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True)))


def _merge_histories(entries: list[dict]) -> dict[str, list]:
    """Element-wise max of several ranks' histories, aligned at the most recent entry."""
    merged = {}
    for role in ROLES:
        histories = [e[role] for e in entries if e[role]]
        n = max((len(h) for h in histories), default=0)
        merged[role] = [max(h[i - n] for h in histories if i - n >= -len(h)) for i in range(n)]
    return merged


class Fp8LinearEmulation:
    """Replaces a megatron-core linear layer's ``_forward_impl`` with its FP8-emulated version and
    keeps the layer's delayed-scaling state (see :func:`enable_fp8_emulation`)."""

    def __init__(self, module, recipe: Fp8Recipe):
        self.inner = module._forward_impl
        self.recipe = recipe
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

    # ---------------------------------------------------------------- checkpoint state
    def histories(self) -> dict[str, list]:
        return {role: list(getattr(self, role).history) for role in ROLES}

    def _extra_state(self, entries: list[dict]) -> dict:
        layout, _ = _parallel_place()
        return {"format": EXTRA_STATE_FORMAT, "layout": list(layout), "ranks": entries}

    def get_extra_state(self) -> dict:
        """This rank's histories (a plain ``state_dict()``: no collective)."""
        _, (tp_rank, dp_rank) = _parallel_place()
        return self._extra_state([{"tp_rank": tp_rank, "dp_rank": dp_rank, **self.histories()}])

    def gathered_extra_state(self) -> dict:
        """Every tensor/data-parallel rank's histories; a collective over that group."""
        from megatron.core import parallel_state as ps

        local = self.get_extra_state()
        layout = local["layout"]
        if layout[0] * layout[1] == 1:
            return local
        gathered = [None] * (layout[0] * layout[1])
        torch.distributed.all_gather_object(
            gathered, local["ranks"][0], group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        return self._extra_state(sorted(gathered, key=lambda e: (e["dp_rank"], e["tp_rank"])))

    def set_extra_state(self, state) -> None:
        if state is None:  # a checkpoint saved without FP8 emulation: megatron's load hook gives None
            return
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        if found != EXTRA_STATE_FORMAT:
            raise ValueError(f"FP8 emulation state in checkpoint has format {found!r}; this version reads "
                             f"{EXTRA_STATE_FORMAT!r} (load without train.fp8, or with a matching megatron-seed)")
        layout, (tp_rank, dp_rank) = _parallel_place()
        own = [e for e in state["ranks"] if (e["tp_rank"], e["dp_rank"]) == (tp_rank, dp_rank)]
        histories = own[0] if tuple(state["layout"]) == layout and own else _merge_histories(state["ranks"])
        for role in ROLES:
            getattr(self, role).history = [float(v) for v in histories[role]][-self.recipe.amax_history_len:]


def _sharded_state_dict(module, emulation: Fp8LinearEmulation, prefix="", sharded_offsets=(), metadata=None):
    """The layer's own sharded state dict, with every rank's FP8 histories in its ``_extra_state``
    object (saved once, by the main replica, under the layer's key)."""
    sharded = type(module).sharded_state_dict(module, prefix, sharded_offsets, metadata)
    sharded[f"{prefix}_extra_state"].data = emulation.gathered_extra_state()
    return sharded


def enable_fp8_emulation(chunks: list, recipe: Optional[Fp8Recipe] = None) -> int:
    """Emulate FP8 in every megatron-core Column/RowParallelLinear of the model chunks (the
    output layer stays in high precision, as with TE). Returns the number of layers changed
    (0 when every layer was emulated already)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_seed.platform.megatron_patches import replace_linear_forward_impl

    recipe = recipe or Fp8Recipe()
    recipe.validate()
    count = 0
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and not name.endswith("output_layer"):
                # The pinned, hash-checked patch ``fp8_linear_forward`` installs the emulation on
                # this instance (megatron_seed.platform.megatron_patches); a layer already emulated
                # is left as it is, so applying this twice changes nothing.
                emulation = Fp8LinearEmulation(module, recipe)
                count += replace_linear_forward_impl(
                    module, emulation, get_extra_state=emulation.get_extra_state,
                    set_extra_state=emulation.set_extra_state,
                    sharded_state_dict=functools.partial(_sharded_state_dict, module, emulation), name=name)
    return count
