"""The policy's weights, in Hugging Face Llama names, gathered in memory from a training run.

RL generates with the policy being trained, so every rollout batch starts by handing the current
weights to the rollout engine. The trainer holds them as megatron-core GPTModel chunks split over
tensor and pipeline parallelism (and virtual pipeline stages); an engine wants whole tensors with
HF names. Going through a checkpoint on disk would work but costs a full write and read per step;
this module does the same conversion in memory:

1. Each rank lists its pieces with megatron-core's own ``sharded_state_dict()`` (SwiGLU's
   ``linear_fc1`` factory applied with ``apply_factories``): for every piece the *global* key
   (``decoder.layers.mlp.linear_fc1.weight``, the layers stacked on a leading axis), the global
   shape and the box it covers (``global_offset`` and the local shape, prepended axes of size 1).
   These are exactly the keys and layouts our checkpoints hold, so the conversion afterwards is
   the checkpoint exporter's (``hf_llama.KEY_MAP`` / ``to_hf``), not a second copy of it.
2. The model-parallel group (the TP x PP ranks of one data-parallel replica; every replica holds
   the same weights, so replicas never talk) exchanges the piece lists with ``all_gather_object``
   (metadata only), and each piece gets one owner: the first rank of the group that holds it.
   Replicated pieces (layer norms on every TP rank, the tied embedding copy on the last stage)
   therefore travel once.
3. Each rank in turn broadcasts the pieces it owns, packed into flat buffers of at most
   ``bucket_bytes`` (one dtype per buffer), and every rank writes them into the global tensors.

Devices and dtypes: the broadcasts run on the parameters' device (CUDA with NCCL, CPU with gloo),
one bucket at a time; the assembled tensors live on CPU (``device`` to change that), in the
parameters' dtype (fp32 or bf16 as trained; nothing is converted). Every rank of the group ends
with the full dict. This is a collective: every rank of the model-parallel group must call it.

It reads the parameters as they are: with megatron-core's distributed optimizer and
``overlap_param_gather`` the updated parameters are all-gathered lazily by the next forward, so
the caller must finish that gather first (e.g. ``ddp_chunk.start_param_sync(force_sync=True)``)
or it ships partly stale weights.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch

from megatron_seed.config.schema import ModelConfig
from megatron_seed.convert.hf_llama import KEY_MAP, MAPPING_BY_OURS, ConversionError, hf_names, to_hf

DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class Piece:
    """One rank's box of one global tensor (picklable: no tensor inside)."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]   # global offset of the box, per axis
    shape: tuple[int, ...]    # box size, per axis (prepended axes count 1)
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def where(self) -> tuple:
        return (self.key, self.offset)


def unwrap_model(chunk):
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def local_pieces(chunks: Iterable) -> list[tuple[Piece, torch.Tensor]]:
    """(piece, its data shaped as the box) for every floating-point tensor of this rank's chunks,
    from megatron-core's sharded state dict; ``_extra_state`` and non-float entries are skipped."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    out = []
    for chunk in chunks:
        sharded = unwrap_model(chunk).sharded_state_dict()
        apply_factories(sharded)
        for value in nested_values(sharded):
            if not isinstance(value, ShardedTensor) or "_extra_state" in value.key:
                continue
            if value.data is None or not value.data.is_floating_point():
                continue
            if value.flattened_range is not None:  # optimizer-state layouts only, never a model
                raise ConversionError(f"{value.key}: flattened shards are not supported")
            k = value.prepend_axis_num
            shape = (1,) * k + tuple(value.local_shape)
            piece = Piece(value.key, tuple(value.global_shape), tuple(value.global_offset), shape, value.dtype)
            out.append((piece, value.data.detach().reshape(shape)))
    return out


def _group():
    """The model-parallel group and its global ranks; (None, [0]) without torch.distributed."""
    if not torch.distributed.is_initialized():
        return None, [0]
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    return group, torch.distributed.get_process_group_ranks(group)


def _plan(per_rank: list[list[Piece]], bucket_bytes: int) -> list[tuple[int, torch.dtype, list[Piece]]]:
    """Buckets (source index in the group, dtype, pieces) in one order every rank computes alike:
    each distinct box is sent once, by the first rank (in group order) that holds it."""
    owned: set = set()
    buckets = []
    for source, pieces in enumerate(per_rank):
        by_dtype: dict = defaultdict(list)
        for piece in pieces:
            if piece.where in owned:
                continue
            owned.add(piece.where)
            by_dtype[piece.dtype].append(piece)
        for dtype in sorted(by_dtype, key=str):
            current, size = [], 0
            for piece in by_dtype[dtype]:
                nbytes = piece.numel * dtype.itemsize
                if current and size + nbytes > bucket_bytes:
                    buckets.append((source, dtype, current))
                    current, size = [], 0
                current.append(piece)
                size += nbytes
            if current:
                buckets.append((source, dtype, current))
    return buckets


def _check_complete(buckets, model: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every key, after checking the boxes cover each tensor exactly
    (a missing stage or layer would otherwise leave uninitialised memory in the result)."""
    shapes: dict = {}
    covered: dict = defaultdict(int)
    for _, dtype, pieces in buckets:
        for piece in pieces:
            if piece.key not in MAPPING_BY_OURS:
                raise ConversionError(f"no conversion rule for the model's tensor {piece.key!r}")
            if shapes.setdefault(piece.key, (piece.global_shape, dtype)) != (piece.global_shape, dtype):
                raise ConversionError(f"{piece.key}: ranks disagree on its global shape or dtype")
            covered[piece.key] += piece.numel
    for key, (shape, _) in shapes.items():
        if covered[key] != math.prod(shape):
            raise ConversionError(f"{key}: the model-parallel group holds {covered[key]} of its "
                                  f"{math.prod(shape)} elements")
        if MAPPING_BY_OURS[key].per_layer and shape[0] != model.num_layers:
            raise ConversionError(f"{key}: {shape[0]} layers, the model config says {model.num_layers}")
    return shapes


def _box(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    return tensor[tuple(slice(o, o + s) for o, s in zip(piece.offset, piece.shape))]


@torch.no_grad()
def gather_global_tensors(chunks: Iterable, model: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                          device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Our global tensors (checkpoint keys, layers stacked on axis 0), whole, on every rank of the
    model-parallel group; see the module docstring for how."""
    mine = local_pieces(chunks)
    if not mine:
        raise ConversionError("this rank's model chunks hold no tensors")
    group, ranks = _group()
    me = ranks.index(torch.distributed.get_rank()) if group is not None else 0
    if len(ranks) > 1:
        per_rank: list = [None] * len(ranks)
        torch.distributed.all_gather_object(per_rank, [p for p, _ in mine], group=group)
    else:
        per_rank = [[p for p, _ in mine]]
    buckets = _plan(per_rank, bucket_bytes)
    shapes = _check_complete(buckets, model)
    result = {key: torch.empty(shape, dtype=dtype, device=device) for key, (shape, dtype) in shapes.items()}
    data = {piece.where: tensor for piece, tensor in mine}
    comm_device = mine[0][1].device
    for source, dtype, pieces in buckets:
        if source == me:
            flat = torch.cat([data[p.where].reshape(-1).to(comm_device) for p in pieces])
        else:
            flat = torch.empty(sum(p.numel for p in pieces), dtype=dtype, device=comm_device)
        if len(ranks) > 1:
            torch.distributed.broadcast(flat, src=ranks[source], group=group)
        at = 0
        for piece in pieces:
            _box(result[piece.key], piece).copy_(flat[at:at + piece.numel].view(piece.shape))
            at += piece.numel
        del flat
    return result


def to_hf_weights(tensors: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our global tensors -> HF Llama tensors, through the checkpoint exporter's key map (q/k/v
    and gate/up split there). Tied embeddings give no ``lm_head.weight``."""
    out: dict[str, torch.Tensor] = {}
    for mapping in KEY_MAP:
        if mapping.ours == "output_layer.weight" and model.tie_embeddings:
            continue  # megatron-core drops it (one stage) or stores the embedding's key (PP > 1)
        if mapping.ours not in tensors:
            raise ConversionError(f"the model has no tensor {mapping.ours!r}")
        tensor = tensors[mapping.ours]
        layers = range(model.num_layers) if mapping.per_layer else [None]
        for layer in layers:
            part = tensor if layer is None else tensor[layer]
            out.update(zip(hf_names(mapping, layer), to_hf(mapping, part, model)))
    return out


def gather_hf_weights(chunks: Iterable, model_config: ModelConfig, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                      device: Optional[Union[str, torch.device]] = "cpu") -> dict[str, torch.Tensor]:
    """The full policy in HF Llama names (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.q_proj.weight``, ...; what ``InferenceModel`` and vLLM's
    ``load_weights`` take), on every rank of the model-parallel group, from this rank's
    GPTModel ``chunks`` (wrapped in DDP / Float16Module or not). Tensors are in the parameters'
    dtype, on ``device`` (CPU by default; the exchange itself runs on the parameters' device).
    Collective over ``parallel_state.get_model_parallel_group()``: call it on every rank."""
    return to_hf_weights(gather_global_tensors(chunks, model_config, bucket_bytes, device), model_config)
