"""Parameter initialisation that does not depend on the parallel layout.

megatron-core draws weights from one generator in construction order, so a rank of a PP=2 run
(which builds only its own layers) draws different numbers than a PP=1 run. Here every tensor is
drawn from a generator seeded by (seed, its global checkpoint key): the full tensor is
generated and the rank keeps its shard, located through megatron-core's own sharded state dict.
The same seed therefore gives the same model at any TP/PP/VPP.

Rules (Llama / Megatron-LM defaults): norms 1; output projections of attention and MLP
(``linear_proj``, ``linear_fc2``) N(0, std / sqrt(2 * num_layers)); everything else N(0, std).
"""

from __future__ import annotations

import math
import zlib

import torch


def _iter_sharded_tensors(sharded):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded.values():
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build_fn(value.key, value.data, value.replica_id, value.flattened_range)
            yield from _iter_sharded_tensors(built if isinstance(built, dict) else {"_": built})
        elif isinstance(value, dict):
            yield from _iter_sharded_tensors(value)
        elif isinstance(value, (list, tuple)):
            yield from _iter_sharded_tensors(dict(enumerate(value)))


def _full_tensor(key: str, shape, seed_key: str, seed: int, std: float, num_layers: int) -> torch.Tensor:
    if "norm" in key.rsplit(".", 2)[-2] or key.endswith("layer_norm_weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(seed_key.encode())) % 2**63)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=g) * std


def _memory_region(t: torch.Tensor) -> tuple:
    """What a view covers: its storage, where it starts, its shape and strides."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


@torch.no_grad()
def init_parameters(chunks: list, seed: int, std: float, num_layers: int) -> None:
    """Overwrite every parameter of every chunk with its layout-independent value."""
    # A tensor reachable twice (a tied embedding held by the first and last stage of one rank) is
    # written once. It is recognised by the memory it covers, never by ``id()``: megatron-core's
    # ShardedTensorFactory (SwiGLU's gate/up halves of ``linear_fc1``) builds temporary views
    # whose ids CPython reuses once the previous chunk's state dict is freed, and an id-based
    # check skipped a half of the second virtual-pipeline chunk's fc1 weight now and then,
    # leaving it uninitialised (an intermittent PP2+VPP2 parity failure).
    seen = set()
    for chunk in chunks:
        for sh in _iter_sharded_tensors(chunk.sharded_state_dict()):
            if sh.data is None or not sh.data.is_floating_point() or "_extra_state" in sh.key:
                continue
            region = _memory_region(sh.data)
            if region in seen:
                continue
            # Leading "prepended" axes index layers (and expert/SwiGLU halves): they select which
            # tensor this is, so they go into the seed; only the remaining axes are generated.
            k = sh.prepend_axis_num
            seed_key = f"{sh.key}@{tuple(sh.global_offset[:k])}"
            full = _full_tensor(sh.key, sh.global_shape[k:], seed_key, seed, std, num_layers)
            index = tuple(slice(off, off + size) for off, size in zip(sh.global_offset[k:], sh.local_shape))
            sh.data.copy_(full[index].reshape(sh.data.shape).to(sh.data.dtype))
            seen.add(region)
