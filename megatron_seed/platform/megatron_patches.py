"""Every change megatron-seed makes to megatron-core, other than the CPU layer, is made here.

The CPU layer (``megatron_cpu``) rewrites CUDA-only code. The rest of the code base changes
megatron-core in a few more places. Each of those changes is a named :class:`Patch` in
:data:`PATCHES` and is applied only by the function for it below:

* ``fused_rope_slots`` (:func:`fill_fused_rope_slots`): ``rope_utils.fused_apply_rotary_pos_emb``
  and ``fused_apply_rotary_pos_emb_thd``, the Triton kernel where Transformer Engine left them None.
* ``compiled_rope_bshd`` (:func:`compile_rope_bshd`): ``rope_utils._apply_rotary_pos_emb_bshd``,
  replaced by its torch.compile'd self.
* ``checkpoint_results_queue`` (:func:`fill_checkpoint_results_queue`):
  ``filesystem_async._results_queue``, a queue from a Manager that dies with the trainer.
* ``fp8_linear_forward`` (:func:`replace_linear_forward_impl`): one Column/RowParallelLinear
  instance's ``_forward_impl``, its extra-state hooks and ``sharded_state_dict`` (FP8 emulation).
* ``gpt_dataset_mask_cache`` (:func:`disable_gpt_dataset_mask_cache`): one GPTDataset instance's
  ``masks_and_position_ids_are_cacheable``.
* ``seed_gpt_model_overrides`` (check only, :func:`verify`): nothing is assigned, but
  ``models.gpt.SeedGPTModel`` overrides ``GPTModel._postprocess`` and
  ``LanguageModule.compute_language_model_loss``, so their upstream source is pinned too.

The callers (``models.kernel_selection``, ``models.compile``, ``models.fp8``, ``models.gpt``,
``checkpoint.checkpointer``) decide *whether* to apply a patch and supply our replacement code;
this module is the one place that *assigns* into megatron-core. One exception remains for now:
``data.datasets._disable_mask_cache`` still sets the GPTDataset flag itself and should call
:func:`disable_gpt_dataset_mask_cache` instead.

Pinning works as in ``megatron_cpu`` and reuses its helpers. Each patch lists the upstream functions
it depends on: the function it replaces, or the code that reads the attribute it sets. The sha256 of
each function's source in megatron-core ``PINNED_MEGATRON_CORE`` is recorded in
:data:`PATCH_HASHES`. The first time a patch is applied in a process, :func:`verify` compares those
functions against the recorded hashes (``megatron_cpu.check_source``). If one differs, on any
megatron-core version, it raises ``RuntimeError``; ``MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON=1``
turns that error into a warning (``megatron_cpu.report_problems``). An attribute that a patch
assigns and that upstream no longer has is reported the same way; with the opt-in the patch is
then skipped rather than applied to something that no longer exists.

Every patch is idempotent. Applying it a second time leaves megatron-core exactly as the first
time did, and ``tests/test_megatron_patches.py`` checks this.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_seed.platform.megatron_cpu import check_source, report_problems, unpinned_allowed

ROPE_UTILS = "megatron.core.models.common.embeddings.rope_utils"
FILESYSTEM_ASYNC = "megatron.core.dist_checkpointing.strategies.filesystem_async"
LAYERS = "megatron.core.tensor_parallel.layers"
GPT_DATASET = "megatron.core.datasets.gpt_dataset"
HERE = "megatron_seed/platform/megatron_patches.py"

# Set on every function that this module puts in place of an upstream one. ORIGINAL names the
# replaced function, which megatron_cpu.source_sha256 then hashes instead, so the check still holds
# after the patch has been applied. PATCHED_BY names the patch, which is how idempotency is checked.
ORIGINAL = "__megatron_seed_original__"
PATCHED_BY = "__megatron_seed_patch__"


@dataclass(frozen=True)
class Patch:
    """A named change to megatron-core, with the upstream code it was written against.

    ``assigns``: ``(module, dotted attribute)`` pairs that the patch sets (on the module, or on
    instances of the named class). Each must exist upstream.
    ``depends_on``: ``(module, qualname)`` pairs for the functions whose source is pinned in
    :data:`PATCH_HASHES`. This is the replaced function, or the code that reads what the patch sets.
    """

    name: str
    assigns: tuple[tuple[str, str], ...]
    depends_on: tuple[tuple[str, str], ...]
    why: str


PATCHES: dict[str, Patch] = {patch.name: patch for patch in (
    Patch(
        "fused_rope_slots",
        assigns=((ROPE_UTILS, "fused_apply_rotary_pos_emb"), (ROPE_UTILS, "fused_apply_rotary_pos_emb_thd")),
        depends_on=((ROPE_UTILS, "apply_rotary_pos_emb"),),
        why="model.kernels=triton: megatron-core calls RoPE fusion through two module globals that only "
            "Transformer Engine fills; the Triton kernel goes into them when TE left them None "
            "(apply_rotary_pos_emb calls them as (t, freqs, interleaved=) and "
            "(t, cu_seqlens, freqs, cp_size=, cp_rank=))",
    ),
    Patch(
        "compiled_rope_bshd",
        assigns=((ROPE_UTILS, "_apply_rotary_pos_emb_bshd"),),
        depends_on=((ROPE_UTILS, "_apply_rotary_pos_emb_bshd"), (ROPE_UTILS, "apply_rotary_pos_emb")),
        why="train.compile: megatron-core's attention applies unfused RoPE through this module-level "
            "function, looked up by name in apply_rotary_pos_emb; swapping in its torch.compile'd self "
            "fuses the elementwise chain without copying megatron-core's attention",
    ),
    Patch(
        "checkpoint_results_queue",
        assigns=((FILESYSTEM_ASYNC, "_results_queue"),),
        depends_on=((FILESYSTEM_ASYNC, "_get_write_results_queue"),),
        why="_get_write_results_queue spawns a Manager for its results queue only while this module "
            "global is None, with no way to pass an initializer; a queue from a Manager of ours that "
            "dies with the trainer goes there first (checkpoint.checkpointer)",
    ),
    Patch(
        "fp8_linear_forward",
        assigns=((LAYERS, "ColumnParallelLinear._forward_impl"), (LAYERS, "RowParallelLinear._forward_impl"),
                 (LAYERS, "ColumnParallelLinear.get_extra_state"), (LAYERS, "ColumnParallelLinear.set_extra_state"),
                 (LAYERS, "ColumnParallelLinear.sharded_state_dict"),
                 (LAYERS, "RowParallelLinear.get_extra_state"), (LAYERS, "RowParallelLinear.set_extra_state"),
                 (LAYERS, "RowParallelLinear.sharded_state_dict")),
        depends_on=((LAYERS, "ColumnParallelLinear._forward_impl"), (LAYERS, "ColumnParallelLinear.forward"),
                    (LAYERS, "ColumnParallelLinear.sharded_state_dict"),
                    (LAYERS, "RowParallelLinear._forward_impl"), (LAYERS, "RowParallelLinear.forward"),
                    (LAYERS, "RowParallelLinear.sharded_state_dict")),
        why="train.fp8 without Transformer Engine: the GEMM of each local linear layer runs through the "
            "instance's _forward_impl(input, weight, ...) called from forward, and the FP8 amax histories "
            "travel in the layer's _extra_state, which its sharded_state_dict saves as a ShardedObject",
    ),
    Patch(
        "gpt_dataset_mask_cache",
        assigns=((GPT_DATASET, "GPTDataset.masks_and_position_ids_are_cacheable"),),
        depends_on=((GPT_DATASET, "GPTDataset.__getitem__"),),
        why="megatron-core 0.16 GPTDataset caches the first sample's loss mask after zeroing that "
            "sample's pad positions in place, so those zeros leak into later samples",
    ),
    Patch(
        "seed_gpt_model_overrides",
        assigns=(),
        depends_on=(("megatron.core.models.gpt.gpt_model", "GPTModel._postprocess"),
                    ("megatron.core.models.common.language_module.language_module",
                     "LanguageModule.compute_language_model_loss")),
        why="models.gpt.SeedGPTModel overrides these two (the chunked and the fused linear "
            "cross-entropy); it relies on their signatures and on _postprocess computing the loss",
    ),
)}


_VERIFIED: dict[str, bool] = {}  # patch name -> applicable, after a successful verify()


def _has(module: str, dotted: str) -> bool:
    """``module.dotted`` exists: a module or class attribute, or, as the last part, an instance
    attribute that the class's own ``__init__`` assigns (``self.<name> = ...``)."""
    try:
        owner = importlib.import_module(module)
    except ImportError:
        return False
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if hasattr(owner, part):
            owner = getattr(owner, part)
            continue
        init = getattr(owner, "__init__", None) if isinstance(owner, type) else None
        return i == len(parts) - 1 and part in getattr(getattr(init, "__code__", None), "co_names", ())
    return True


def problems(name: str) -> list[str]:
    """One message per pinned function of patch ``name`` whose source differs from the pinned one,
    and per attribute it assigns that upstream no longer has."""
    patch = PATCHES[name]
    found = [check_source(module, qualname, PATCH_HASHES, f"patch {name}: {patch.why}")
             for module, qualname in patch.depends_on]
    found += [f"{module}.{attribute}: no longer exists upstream (patch {name} assigns it)"
              for module, attribute in patch.assigns if not _has(module, attribute)]
    return [problem for problem in found if problem is not None]


def check_patch_targets() -> list[str]:
    """Every patch's :func:`problems` (importing every patched module); empty on the pinned release."""
    return [problem for name in PATCHES for problem in problems(name)]


def verify(name: str, strict: Optional[bool] = None) -> bool:
    """Check patch ``name`` against the pinned megatron-core, once per process, before it is applied.

    A difference raises ``RuntimeError`` when ``strict`` is true. ``strict`` defaults to true
    unless ``MEGATRON_SEED_ALLOW_UNPINNED_MEGATRON=1``; when it is false, a difference is a
    warning. Returns whether the patch can be applied, which is false only when an attribute
    it assigns no longer exists.
    """
    if name in _VERIFIED:
        return _VERIFIED[name]
    report_problems(problems(name), not unpinned_allowed() if strict is None else strict,
                    layer=f"megatron-core patch {name!r}", where=HERE)
    _VERIFIED[name] = all(_has(module, attribute) for module, attribute in PATCHES[name].assigns)
    return _VERIFIED[name]


# --------------------------------------------------------------------------------------------
# the patches


def fill_fused_rope_slots(bshd: Callable, thd: Callable) -> bool:
    """Patch ``fused_rope_slots``. Put ``bshd`` into ``rope_utils.fused_apply_rotary_pos_emb`` and
    ``thd`` into ``fused_apply_rotary_pos_emb_thd``, but only where the slot is None; a slot that
    Transformer Engine filled keeps TE's kernel.

    Only a model whose config sets ``apply_rope_fusion`` reads these slots. TransformerConfig
    refuses that flag while both slots are None, so call this before building the config.
    Idempotent. Returns whether the slots can be used (false only with the unpinned opt-in when
    the slots are gone).
    """
    if not verify("fused_rope_slots"):
        return False
    rope_utils = importlib.import_module(ROPE_UTILS)
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = bshd
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = thd
    return True


def fused_rope_slot() -> Optional[Callable]:
    """What ``rope_utils.fused_apply_rotary_pos_emb`` holds now: TE's kernel, ours, or None."""
    return importlib.import_module(ROPE_UTILS).fused_apply_rotary_pos_emb


def compile_rope_bshd() -> bool:
    """Patch ``compiled_rope_bshd``. Replace ``rope_utils._apply_rotary_pos_emb_bshd`` with
    ``torch.compile(itself, dynamic=False)``. The compiled function computes the same expression;
    Inductor turns its cos/sin, muls, rotate-half cat and add into one loop.

    The change is process-wide. Idempotent: a function that is already compiled is left as it is.
    Returns whether the compiled function is in place.
    """
    import torch

    if not verify("compiled_rope_bshd"):
        return False
    rope_utils = importlib.import_module(ROPE_UTILS)
    current = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(current, PATCHED_BY, None) == "compiled_rope_bshd":
        return True
    compiled = torch.compile(current, dynamic=False)
    setattr(compiled, ORIGINAL, current)
    setattr(compiled, PATCHED_BY, "compiled_rope_bshd")
    rope_utils._apply_rotary_pos_emb_bshd = compiled
    return True


def fill_checkpoint_results_queue(make_queue: Callable[[], object]) -> bool:
    """Patch ``checkpoint_results_queue``. If megatron-core has not created its write-results
    queue yet (``filesystem_async._results_queue`` is None), set it to ``make_queue()``.

    Idempotent: a queue that is already there, ours or megatron-core's, is kept, and
    ``make_queue`` is not called. Returns whether ``make_queue``'s queue was installed.
    """
    if not verify("checkpoint_results_queue"):
        return False
    filesystem_async = importlib.import_module(FILESYSTEM_ASYNC)
    if filesystem_async._results_queue is not None:
        return False
    filesystem_async._results_queue = make_queue()
    return True


def replace_linear_forward_impl(module, forward_impl: Callable, get_extra_state: Callable,
                                set_extra_state: Callable, sharded_state_dict: Callable, name: str = "") -> bool:
    """Patch ``fp8_linear_forward``. On one Column/RowParallelLinear instance ``module``, put
    ``forward_impl`` in place of its GEMM (``_forward_impl``) and install the given extra-state
    hooks and ``sharded_state_dict``. Only this instance changes, not its class.

    torch writes and reads ``_extra_state`` only for classes that define the hooks. If the class
    does not define them the state would be lost, so this raises. ``name`` is used in that error
    message. Idempotent: an instance whose ``_forward_impl`` has already been replaced is left
    unchanged. Returns whether ``module`` was changed.
    """
    import torch

    if not verify("fp8_linear_forward"):
        return False
    if type(module).get_extra_state is torch.nn.Module.get_extra_state:
        raise RuntimeError(f"{type(module).__qualname__} ({name}) has no extra-state hooks: the "
                           "FP8 amax histories would be missing from checkpoints")
    if "_forward_impl" in vars(module):
        return False
    module._forward_impl = forward_impl
    module.get_extra_state = get_extra_state
    module.set_extra_state = set_extra_state
    module.sharded_state_dict = sharded_state_dict
    return True


def disable_gpt_dataset_mask_cache(dataset) -> bool:
    """Patch ``gpt_dataset_mask_cache``. Make one GPTDataset instance compute its masks for
    every sample instead of caching them (recomputing is cheap). Idempotent. Returns whether the
    dataset has the flag.
    """
    if not verify("gpt_dataset_mask_cache"):
        return False
    if not hasattr(dataset, "masks_and_position_ids_are_cacheable"):
        return False
    dataset.masks_and_position_ids_are_cacheable = False
    return True


# sha256 of the source, in megatron-core PINNED_MEGATRON_CORE, of every function a patch depends on.
PATCH_HASHES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rope_utils.apply_rotary_pos_emb": (
        "2752798f27ef46ca8a977e6f63e3f001cd0e56aca59ec920483094e4336a7d0f"
    ),
    "megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd": (
        "2d6f53f0fe6f5352d43f16b920a92ec8562445eb19b6a82555a1e90c79fe0d82"
    ),
    "megatron.core.dist_checkpointing.strategies.filesystem_async._get_write_results_queue": (
        "349269cbdd569d41032d20cdb858316d492096999e7a05dd2d1ccde6ae9d7d95"
    ),
    "megatron.core.tensor_parallel.layers.ColumnParallelLinear._forward_impl": (
        "6042a461a2e654e962827015f05824d245f0275a6adbedf40e49fcabfe8d6b32"
    ),
    "megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward": (
        "3f9d98f23b319c03d963768a2a63c92d55153b582073658963f69a276871070c"
    ),
    "megatron.core.tensor_parallel.layers.ColumnParallelLinear.sharded_state_dict": (
        "c79188acabb34d1ea932ec9f8a4d0123a61ddce69663f7a4ea4caf72bcd472ab"
    ),
    "megatron.core.tensor_parallel.layers.RowParallelLinear._forward_impl": (
        "6042a461a2e654e962827015f05824d245f0275a6adbedf40e49fcabfe8d6b32"
    ),
    "megatron.core.tensor_parallel.layers.RowParallelLinear.forward": (
        "2148db9855a3b204b5cff999739e59ce738c129759c8d50b269ebdc44fda7893"
    ),
    "megatron.core.tensor_parallel.layers.RowParallelLinear.sharded_state_dict": (
        "dcd7772db1032fa69b17dab02c5894ce5e6b1d9d6ab7a969f7b6e8978d4d2b3c"
    ),
    "megatron.core.datasets.gpt_dataset.GPTDataset.__getitem__": (
        "05cef6462ceb2bcf09891c1222fb0cf80cfc9d25810287dafe20cf24124e9786"
    ),
    "megatron.core.models.gpt.gpt_model.GPTModel._postprocess": (
        "a5f7de0bfb1cad97b680b964bdea46140959571a1b74a68651fefe5a276363df"
    ),
    "megatron.core.models.common.language_module.language_module.LanguageModule.compute_language_model_loss": (
        "86cf8e890a0f9c9b4e22410d3d1e3b2ee2377e0abe26e06e7ebf544a542c7962"
    ),
}
