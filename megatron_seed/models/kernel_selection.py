"""``model.kernels``: where the Triton kernels of ``kernels/`` enter the model, all in this file.

* ``torch`` - never Triton: RMSNorm and SwiGLU are torch modules (fused by ``train.compile`` on
  CPU), RoPE is megatron-core's, the loss is the chunked cross entropy over full logits.
* ``triton`` - the local layer spec gets Triton RMSNorm and SwiGLU modules; RoPE goes through
  megatron-core's fused-RoPE slot (``apply_rope_fusion``), filled with the Triton kernel unless
  Transformer Engine already filled it; the language-model loss is the fused linear
  cross-entropy (the [tokens, vocab] logits never exist). Needs CUDA, or Triton's interpreter
  (``TRITON_INTERPRET=1``), which only tests use.
* ``auto`` - ``triton`` on CUDA when ``triton`` imports, ``torch`` otherwise (so never the
  interpreter in a training run).

With the Transformer Engine spec, TE's own fused layers (norm + linear, activation) and TE's
fused RoPE come first; the Triton loss still replaces the unfused one. FP8 emulation on the local
spec works on the output layer's matmul, so with ``train.fp8`` the loss stays unfused there.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_seed.models.norm import RMSNorm
from megatron_seed.models.swiglu import SwiGLU


def imports_cleanly(module: str) -> bool:
    """Installed and importable. A broken install (Transformer Engine without cuDNN, a triton
    built for another torch) means "not usable here", not an error."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def triton_importable() -> bool:
    return imports_cleanly("triton")


def resolve_kernels(choice: str) -> str:
    """``model.kernels`` -> ``"triton"`` or ``"torch"`` for this process (errors name the key)."""
    from megatron_seed_kernels._common import interpreting

    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if torch.cuda.is_available() and triton_importable() else "torch"
    if not triton_importable():
        raise RuntimeError("model.kernels=triton but triton does not import (pip install triton); "
                           "use model.kernels=auto or torch")
    if not torch.cuda.is_available() and not interpreting():
        raise RuntimeError("model.kernels=triton needs a CUDA GPU (on a CPU Triton kernels run only under "
                           "TRITON_INTERPRET=1, which is for tests: very slow); use model.kernels=auto or torch")
    return "triton"


class TritonRMSNorm(RMSNorm):
    uses_triton = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron_seed_kernels import rms_norm

        return rms_norm(x, self.weight, self.eps)


class TritonSwiGLU(SwiGLU):
    uses_triton = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron_seed_kernels import swiglu

        gate, up = torch.chunk(x, 2, dim=-1)  # views of the fused fc1 output: the kernel reads them in place
        return swiglu(gate, up)


def norm_and_activation(kernels: str):
    """The (RMSNorm, SwiGLU) module classes for the local layer spec."""
    return (TritonRMSNorm, TritonSwiGLU) if kernels == "triton" else (RMSNorm, SwiGLU)


def _rope_from_freqs(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron-core's fused-RoPE signature on the Triton kernel: t [s, b, h, d], freqs [s, 1, 1, d]."""
    from megatron_seed_kernels import apply_rope

    rot_dim = freqs.shape[-1]
    if interleaved or rot_dim != t.shape[-1]:
        raise NotImplementedError("the Triton RoPE kernel rotates whole heads in the non-interleaved layout "
                                  f"(head_dim {t.shape[-1]}, rotary dim {rot_dim}, interleaved {interleaved})")
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    rotated, _ = apply_rope(t, None, cos, sin)
    return rotated


def _rope_thd_from_freqs(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                         cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """Packed sequences [tokens, h, d]: each token rotated by its position inside its own sequence."""
    if cp_size != 1:
        raise NotImplementedError("the Triton RoPE kernel does not split packed sequences over context parallelism")
    tokens = t.shape[0]
    index = torch.arange(tokens, device=t.device)
    starts = cu_seqlens[:-1].to(t.device)
    positions = index - starts[torch.searchsorted(starts, index, right=True) - 1]
    return _rope_from_freqs(t.unsqueeze(1), freqs[positions]).squeeze(1)


def enable_fused_rope() -> bool:
    """Fill megatron-core's fused-RoPE slots with the Triton kernel where TE has not filled them
    (the pinned, hash-checked patch ``fused_rope_slots`` of megatron_seed.platform.megatron_patches).
    Only models whose config sets ``apply_rope_fusion`` read the slots, so this changes nothing
    for others; idempotent. Returns whether the slots are usable."""
    from megatron_seed.platform.megatron_patches import fill_fused_rope_slots

    return fill_fused_rope_slots(_rope_from_freqs, _rope_thd_from_freqs)


def fused_lm_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor, loss_mask=None) -> torch.Tensor:
    """The language-model loss [b, s] of a megatron-core GPTModel from its final hidden states
    [s, b, h], with the output layer fused into the loss. The input side of the output layer
    (sequence-parallel gather, or the tensor-parallel copy whose backward all-reduces d hidden)
    is megatron-core's own; positions with ``loss_mask == 0`` are excluded (loss 0), which is what
    lets backward use the gradients computed in forward (see megatron_seed_kernels.fused_linear_cross_entropy)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    from megatron_seed_kernels.fused_linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_per_token

    tp = model.pg_collection.tp
    weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
              else model.output_layer.weight)
    if model.output_layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden_states, group=tp)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden_states, group=tp)
    s, b, h = hidden.shape
    target = labels.transpose(0, 1)
    if loss_mask is not None:
        target = target.masked_fill(loss_mask.transpose(0, 1) == 0, IGNORE_INDEX)
    loss = linear_cross_entropy_per_token(hidden.reshape(s * b, h), weight, target.reshape(-1),
                                          tp_group=tp if tp.size() > 1 else None)
    return loss.view(s, b).transpose(0, 1).contiguous()


def describe_kernels(chunks: list) -> str:
    """Which ops run fused, and by whom, for the run log ("torch" when none)."""
    from megatron_seed.platform.megatron_patches import fused_rope_slot

    fused = [f"{type(m).__name__.removeprefix('Triton')} (Triton)"
             for m in {type(m): m for c in chunks for m in c.modules() if getattr(m, "uses_triton", False)}.values()]
    if any(getattr(c, "fused_linear_loss", False) for c in chunks):
        fused.append("linear cross-entropy (Triton)")
    if chunks and chunks[0].config.apply_rope_fusion:
        fused.append("RoPE (Triton)" if fused_rope_slot() is _rope_from_freqs
                     else "RoPE (Transformer Engine)")
    return ", ".join(sorted(fused)) if fused else "torch"
