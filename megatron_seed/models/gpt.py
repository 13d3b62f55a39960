"""The Seed-Coder / Llama-3 decoder as a megatron-core ``GPTModel``.

The model is megatron-core's own GPTModel built from a ``TransformerConfig`` and a layer spec;
this module only translates our :class:`ModelConfig` into those two and picks the spec:

* Transformer Engine spec (fused layers, FP8) when ``transformer_engine`` imports and CUDA is up;
* megatron-core local spec otherwise, with core attention swapped for :class:`SDPAttention`.

``model.kernels`` decides where Triton kernels replace torch code (norm, activation, RoPE, the
fused lm-head loss); the kernels themselves are in megatron_seed.models.kernel_selection.

Parallelism (TP/PP/VPP, sequence parallel), recompute and precision are applied here from the
run config, in one place, not inside the model definition. Optimizations (fused RoPE, FP8,
the fused loss, torch.compile) are decided once per build and applied from outside the plain
model, in a fixed order, by megatron_seed.models.optimize.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_seed.config.schema import ModelConfig, ParallelConfig, TrainConfig
from megatron_seed.models.kernel_selection import fused_lm_loss, norm_and_activation
from megatron_seed.models.optimize import OptimizationPlan, apply_optimizations, config_options, resolve_plan
# Resolved in optimize with the rest of the plan; imported from here by callers that pick by spec.
from megatron_seed.models.optimize import resolve_impl, transformer_engine_available  # noqa: F401


def _leave_as_is(tensor):
    return tensor


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig,
                             plan: Optional[OptimizationPlan] = None):
    """megatron-core's TransformerConfig for ``model``. ``plan`` (resolved here when not given)
    decides the spec-dependent fusions, and :func:`megatron_seed.models.optimize.config_options`
    adds fused RoPE (filling megatron-core's slots first) and Transformer Engine's FP8 recipe."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    plan = plan or resolve_plan(model, train)
    bf16 = train.precision == "bf16"
    impl = plan.impl
    recompute = {} if train.recompute == "none" else (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if train.recompute == "full" else dict(recompute_granularity="selective"))
    # Fused RoPE (TE's where TE filled megatron-core's slot, else the Triton kernel's) and FP8 for
    # Transformer Engine; the local layers get the FP8 emulation after the build (optimize).
    optimizations = config_options(plan)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        # Weights are drawn afterwards by megatron_seed.models.init (the same model at any
        # TP/PP). megatron-core's initialisation still runs, with a no-op init method, because it
        # is what tags parameters as tensor-parallel (used by grad norms and optimizers).
        perform_initialization=True,
        init_method=_leave_as_is,
        output_layer_init_method=_leave_as_is,
        use_cpu_initialization=True,
        # CUDA-only fusions are enabled only where their kernels exist.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=impl == "transformer_engine",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # The local spec puts SwiGLU in the MLP's activation-module slot (megatron_seed.models.swiglu).
        use_te_activation_func=impl == "local",
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=True,
        **recompute,
        **optimizations,
    )


def layer_spec(model: ModelConfig, plan: OptimizationPlan, context_parallel: int = 1):
    """The transformer layer spec: Transformer Engine's, or megatron-core's local one with our
    RMSNorm (sequence-parallel capable) and SwiGLU (torch or Triton, by ``model.kernels``) and,
    by default, SDPA core attention; with context parallelism the ring attention
    (megatron_seed.models.context_parallel) instead; ``plan`` says which spec and kernels."""
    from megatron.core.models.gpt import gpt_layer_specs

    if plan.impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    RMSNorm, SwiGLU = norm_and_activation(plan.kernels)
    spec = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    if context_parallel > 1:
        from megatron_seed.models.context_parallel import RingAttention

        spec.submodules.self_attention.submodules.core_attention = RingAttention
    elif model.attention_backend == "sdpa":
        from megatron_seed.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(model: ModelConfig, config, vp_stage, plan: OptimizationPlan):
    """This pipeline stage's layers plus the final norm (ours on the local spec)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules, get_num_layers_to_build)

    spec = layer_spec(model, plan, config.context_parallel_size)
    if plan.impl == "transformer_engine":
        return spec
    RMSNorm, _ = norm_and_activation(plan.kernels)
    layers = get_num_layers_to_build(config, vp_stage=vp_stage,
                                     pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)


@functools.cache  # one class per process (megatron-core is imported lazily, hence not at module level)
def _seed_gpt_model_class():
    """megatron-core's GPTModel with the language-model loss computed by our chunked vocab-parallel
    cross entropy (no float32 [tokens, vocab] tensors; see megatron_seed.models.cross_entropy), or,
    with ``fused_linear_loss`` set (model.kernels=triton), by the Triton fused linear cross-entropy
    from the final hidden states (no logits at all). Everything else, including the fused TE/native
    cross entropy when configured, is upstream's."""
    from megatron.core.models.gpt import GPTModel

    from megatron_seed.models.cross_entropy import vocab_parallel_cross_entropy
    from megatron_seed.platform.megatron_patches import verify

    # The overrides below rely on upstream's _postprocess and compute_language_model_loss: both
    # pinned and hash-checked (megatron_patches, "seed_gpt_model_overrides").
    verify("seed_gpt_model_overrides")

    class SeedGPTModel(GPTModel):
        fused_linear_loss = False

        def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
            if (self.fused_linear_loss and labels is not None and self.post_process
                    and self.config.mtp_num_layers is None and kwargs.get("inference_context") is None):
                return fused_lm_loss(self, hidden_states, labels, kwargs.get("loss_mask"))
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)

        def compute_language_model_loss(self, labels, logits):
            if self.config.cross_entropy_loss_fusion:
                return super().compute_language_model_loss(labels, logits)
            loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
            return loss.transpose(0, 1).contiguous()  # [s, b] -> [b, s]

    return SeedGPTModel


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig,
                       seq_length: Optional[int] = None, seed: int = 1234) -> list:
    """One GPTModel per virtual pipeline stage held by this rank (one without interleaving): the
    plain megatron-core model, built and initialised here, then optimized from outside by
    :func:`megatron_seed.models.optimize.apply_optimizations` (fused loss, FP8, torch.compile,
    in that order) under the plan resolved once at the start."""
    from megatron.core import parallel_state

    GPTModel = _seed_gpt_model_class()
    plan = resolve_plan(model, train)
    config = build_transformer_config(model, parallel, train, plan)
    chunks = []
    for vp_stage in range(parallel.virtual_pipeline or 1):
        vp = vp_stage if parallel.virtual_pipeline else None
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(model, config, vp, plan),
            vocab_size=model.vocab_size,
            max_sequence_length=seq_length or model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            vp_stage=vp,
        )
        if torch.cuda.is_available():
            gpt.cuda(torch.cuda.current_device())
        chunks.append(gpt)
    from megatron_seed.models.init import init_parameters

    init_parameters(chunks, seed, model.init_std, model.num_layers)
    return apply_optimizations(chunks, plan)
