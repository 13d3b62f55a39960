"""Triton training kernels, each with a plain-torch reference next to it.

* :func:`linear_cross_entropy` - the lm-head matmul fused with the cross-entropy loss, in token
  chunks (the [tokens, vocab] logits never exist), vocab-parallel over a tensor-parallel group;
* :func:`swiglu` - ``silu(gate) * up``;
* :func:`rms_norm` - RMSNorm, with the weight gradient;
* :func:`apply_rope` - rotary embedding on q and k in one launch (megatron-core's layout).

They run compiled on CUDA. On a CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this package is imported), which the tests use; training on
a CPU takes the torch path (``model.kernels=auto`` picks it). The model uses them through one place,
``megatron_seed.models.kernel_selection``. Importing this package needs ``triton``; the names are
resolved on first use so that ``import megatron_seed_kernels`` itself is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "linear_cross_entropy": "megatron_seed_kernels.fused_linear_cross_entropy",
    "linear_cross_entropy_per_token": "megatron_seed_kernels.fused_linear_cross_entropy",
    "linear_cross_entropy_reference": "megatron_seed_kernels.fused_linear_cross_entropy",
    "swiglu": "megatron_seed_kernels.swiglu_triton",
    "swiglu_reference": "megatron_seed_kernels.swiglu_triton",
    "rms_norm": "megatron_seed_kernels.rms_norm_triton",
    "rms_norm_reference": "megatron_seed_kernels.rms_norm_triton",
    "apply_rope": "megatron_seed_kernels.rope_triton",
    "apply_rope_reference": "megatron_seed_kernels.rope_triton",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_seed_kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
