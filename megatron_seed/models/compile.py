"""``train.compile``: fuse the elementwise chains of the local layer spec with ``torch.compile``.

What is compiled, and why only that: on CPU a training step of the local spec spends most of its
non-matmul time in short elementwise chains that eager PyTorch runs op by op over activation-sized
tensors: RMSNorm (pow, mean, rsqrt, two muls, and their backward), SwiGLU (silu, mul, and
backward) and megatron-core's RoPE function (cos/sin, muls, rotate-half cat, add). Inductor turns each chain into one loop over the data (bf16, [512, 4, 768] RMSNorm
forward+backward: 10.0 -> 2.1 ms; [512, 4, 4096] SwiGLU: 13.6 -> 4.4 ms, on the reference
2-core machine). The matmuls, attention, communication and megatron-core's own control flow stay
eager, so graph breaks, recompiles and compile time stay small (~20 s once per process) and
parallelism, recompute and checkpointing behave exactly as without it.

Applied from outside the model definition, to modules of the two classes, after the model is
built. With Transformer Engine (GPU) its own fused layers are used and nothing is compiled here.
"""

from __future__ import annotations

import torch

from megatron_seed.models.norm import RMSNorm
from megatron_seed.models.swiglu import SwiGLU

COMPILED_CLASSES = (RMSNorm, SwiGLU)


def compile_rotary_embedding() -> None:
    """megatron-core applies RoPE through a module-level function (``rope_utils.
    _apply_rotary_pos_emb_bshd``: cos/sin, two muls, a rotate-half cat and neg, an add, a cat),
    called by name from its attention. Replacing that name with its compiled self is the only way
    to fuse it without copying megatron-core's attention; it is process-wide and idempotent, and
    the compiled function computes the same expression. The swap is the pinned, hash-checked
    patch ``compiled_rope_bshd`` of megatron_seed.platform.megatron_patches."""
    from megatron_seed.platform.megatron_patches import compile_rope_bshd

    compile_rope_bshd()


def match_aten_vector_width() -> None:
    """Have Inductor's C++ kernels use the vector width ATen itself runs at on this CPU.

    Left to itself, Inductor picks its vector ISA from the CPU; with ATen held to AVX2
    (``ATEN_CPU_CAPABILITY=avx2`` on an AVX512 CPU) its kernels came out wrong (RMSNorm backward
    off by 1e25 with one thread, NaN losses), while an explicit width of 256 or 512 bits was right
    either way (measured with torch 2.13). Setting the width ATen reports makes the two agree on any
    CPU. Process-wide Inductor setting; an explicit user setting is kept."""
    if torch.cuda.is_available():
        return
    import torch._inductor.config as inductor_config

    width = {"AVX2": 256, "AVX512": 512}.get(torch.backends.cpu.get_cpu_capability())
    if inductor_config.cpp.simdlen is None and width is not None:
        inductor_config.cpp.simdlen = width


def compile_elementwise(chunks: list) -> None:
    """Compile every RMSNorm and SwiGLU module of ``chunks`` in place, and megatron-core's RoPE
    function (:func:`compiled_modules` counts what was compiled)."""
    match_aten_vector_width()
    compile_rotary_embedding()
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, COMPILED_CLASSES) and not getattr(module, "uses_triton", False):
                # Shapes are fixed within a run (seq length, micro-batch): static shapes give the
                # simplest kernels; an eval batch of another size recompiles once.
                module.compile(dynamic=False)


def compiled_modules(chunks: list) -> int:
    """How many modules of ``chunks`` run compiled (``nn.Module.compile`` was applied)."""
    return sum(getattr(m, "_compiled_call_impl", None) is not None for c in chunks for m in c.modules())
