"""Optimizations, applied from outside the model in one place (like torchtitan's parallelize.py).

``models.gpt`` builds a plain megatron-core GPTModel. This module decides how that model is
optimized and applies the optimizations. The decisions are made once per build, by
:func:`resolve_plan`, from the run config and this machine:

* ``impl``: the layer spec. ``model.transformer_impl``; ``auto`` means Transformer Engine when it
  imports and CUDA is up, otherwise megatron-core's local spec.
* ``kernels``: where Triton kernels are used. ``model.kernels``, resolved by
  :func:`megatron_seed.models.kernel_selection.resolve_kernels`.
* everything below follows from those two and from ``train.fp8`` and ``train.compile``.

The order of application is fixed:

Before the model exists. These go into the TransformerConfig (:func:`config_options`, called by
``models.gpt.build_transformer_config``), because megatron-core reads them when the config and
the layers are built:

1. Fused RoPE. With ``kernels=triton``, the Triton kernel goes into megatron-core's fused-RoPE
   slots where Transformer Engine left them empty (platform patch ``fused_rope_slots``). Then
   ``apply_rope_fusion`` is set, or it is set because TE's kernel is in the slot. The slots must
   be filled before the config is built: ``TransformerConfig.__post_init__`` refuses
   ``apply_rope_fusion`` while both slots are None.
2. FP8 on Transformer Engine: TE's delayed-scaling recipe goes into the config.

The layer spec also follows the plan (``models.gpt.layer_spec``): Triton RMSNorm and SwiGLU
modules with ``kernels=triton``, TE's fused layers with ``impl=transformer_engine``.

On the built model, after its weights are initialised (:func:`apply_optimizations`, the one call
in ``models.gpt.build_model_chunks``):

3. Fused loss. With ``kernels=triton`` and no FP8, the language-model loss is the Triton fused
   linear cross-entropy (``SeedGPTModel.fused_linear_loss``). Under FP8 emulation it stays
   unfused.
4. FP8 emulation on the local spec: every linear layer except the output layer runs its GEMM
   through the emulation (platform patch ``fp8_linear_forward``).
5. ``torch.compile`` on the local spec: the RMSNorm and SwiGLU modules and megatron-core's RoPE
   function (platform patch ``compiled_rope_bshd``). This comes last, so it compiles the modules
   in their final form.

This is the order the model builder has always used, so losses are the same bit for bit. Each step
is idempotent, and none of them changes the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_seed.config.schema import ModelConfig, TrainConfig
from megatron_seed.models.fp8 import Fp8Recipe, enable_fp8_emulation, transformer_config_kwargs
from megatron_seed.models.kernel_selection import enable_fused_rope, imports_cleanly, resolve_kernels

TRANSFORMER_ENGINE = "transformer_engine"


def transformer_engine_available() -> bool:
    """TE is used only with CUDA, and only if it imports (it fails to import without cuDNN)."""
    return torch.cuda.is_available() and imports_cleanly("transformer_engine.pytorch")


def resolve_impl(model: ModelConfig) -> str:
    """``model.transformer_impl`` -> ``"transformer_engine"`` or ``"local"`` for this process."""
    if model.transformer_impl == "auto":
        return TRANSFORMER_ENGINE if transformer_engine_available() else "local"
    if model.transformer_impl == TRANSFORMER_ENGINE and not transformer_engine_available():
        raise RuntimeError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not usable here "
            "(needs CUDA and `pip install megatron-seed[te]`); use model.transformer_impl=local")
    return model.transformer_impl


@dataclass(frozen=True)
class OptimizationPlan:
    """What is applied to the model, resolved once (:func:`resolve_plan`)."""

    impl: str                     # "transformer_engine" | "local": the layer spec
    kernels: str                  # "triton" | "torch": Triton norm/SwiGLU in the local spec, fused RoPE and loss
    rope_fusion: Optional[str]    # None | "triton" (slots filled by us) | "transformer_engine" (TE's slot)
    fp8: Optional[str]            # train.fp8 recipe format, None without FP8
    te_fp8: bool                  # FP8 through Transformer Engine's recipe in the config
    fp8_emulation: bool           # FP8 emulated on the local spec's linear layers
    fused_loss: bool              # Triton fused linear cross-entropy as the language-model loss
    compile: bool                 # torch.compile of RMSNorm, SwiGLU and megatron-core's RoPE function


def resolve_plan(model: ModelConfig, train: TrainConfig) -> OptimizationPlan:
    """The plan for ``model`` trained with ``train`` on this machine. Errors name the config key
    (transformer impl first, then kernels, as the builder always checked them)."""
    impl = resolve_impl(model)
    kernels = resolve_kernels(model.kernels)
    if kernels == "triton":
        rope_fusion = "triton"
    elif impl == TRANSFORMER_ENGINE:
        from megatron_seed.platform.megatron_patches import fused_rope_slot

        rope_fusion = TRANSFORMER_ENGINE if fused_rope_slot() is not None else None
    else:
        rope_fusion = None
    fp8 = train.fp8 or None
    local = impl != TRANSFORMER_ENGINE
    return OptimizationPlan(
        impl=impl, kernels=kernels, rope_fusion=rope_fusion, fp8=fp8,
        te_fp8=bool(fp8) and not local, fp8_emulation=bool(fp8) and local,
        fused_loss=kernels == "triton" and not fp8, compile=bool(train.compile) and local)


def config_options(plan: OptimizationPlan) -> dict:
    """Steps 1 and 2: the TransformerConfig keyword arguments that the plan decides.

    With ``kernels=triton``, this fills megatron-core's fused-RoPE slots, so call it before the
    config is built.
    """
    rope = plan.rope_fusion == TRANSFORMER_ENGINE or (plan.rope_fusion == "triton" and enable_fused_rope())
    fp8 = transformer_config_kwargs(Fp8Recipe(format=plan.fp8)) if plan.te_fp8 else {}
    return dict(apply_rope_fusion=bool(rope), **fp8)


def apply_optimizations(chunks: list, plan: OptimizationPlan) -> list:
    """Steps 3 to 5, on the built and initialised model chunks, in that order. Returns ``chunks``."""
    if plan.fused_loss:
        for chunk in chunks:
            chunk.fused_linear_loss = True
    if plan.fp8_emulation:
        enable_fp8_emulation(chunks, Fp8Recipe(format=plan.fp8))
    if plan.compile:
        from megatron_seed.models.compile import compile_elementwise

        compile_elementwise(chunks)
    return chunks
