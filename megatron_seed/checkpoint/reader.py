"""Our checkpoints as global tensors: read layer by layer, written from a full set of tensors.

Reading asks torch.distributed.checkpoint (the format under megatron-core's ``torch_dist``
backend) for one layer's box of each layer-stacked tensor, so peak memory is about one layer
(plus embeddings), whatever TP/PP the checkpoint was saved with. Writing goes through megatron-core's own GPTModel sharded state
dict (built on one process), so key names and layouts are exactly what training loads.
Which tensor fills which parameter (e.g. the Hugging Face key map) is the caller's: this module
knows only checkpoint keys.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable, Iterator, Optional

import torch

from megatron_seed.checkpoint.checkpointer import Checkpointer
from megatron_seed.checkpoint.layout import (iteration_dir, latest_checkpoint, publish, read_model_config,
                                              write_model_config)
from megatron_seed.config.schema import ModelConfig


class CheckpointFormatError(ValueError):
    """A checkpoint lacks a tensor, or a tensor does not fit the model; the message says which.
    (``convert.hf_llama.ConversionError`` derives from it.)"""


def _chunk_load_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """Reads one box (offsets, sizes) of each requested global tensor, e.g. one layer of a
        layer-stacked tensor, into a buffer of the box's shape."""

        def __init__(self, chunks: dict):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._chunks = chunks

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, sizes) in self._chunks.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]  # the buffer holds exactly the requested box

    return ChunkLoadPlanner


def _ChunkLoadPlanner(chunks: dict):
    return _chunk_load_planner_class()(chunks)


class CheckpointReader:
    """Global tensors of a checkpoint (the newest under ``root``), one layer at a time, read with
    torch.distributed.checkpoint directly (tensors only: no pickled objects are loaded, and no
    process group is needed)."""

    def __init__(self, root: str):
        from torch.distributed.checkpoint import FileSystemReader

        self.root = root
        self.model = read_model_config(root)
        self.path = latest_checkpoint(root)
        if self.path is None:
            raise FileNotFoundError(f"no complete checkpoint under {root}")
        self._meta = FileSystemReader(self.path).read_metadata().state_dict_metadata

    def has(self, key: str) -> bool:
        return key in self._meta

    def read(self, requests: list[tuple[str, Optional[int]]], meta: bool = False) -> list[torch.Tensor]:
        """Tensors for (key, layer) pairs (layer None: the whole tensor), in one read; with ``meta``
        only their shapes and dtypes (meta tensors, nothing read)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        chunks, out = {}, {}
        for key, layer in requests:
            if key not in self._meta:
                raise CheckpointFormatError(f"{self.path} has no tensor {key!r}")
            size, dtype = tuple(self._meta[key].size), self._meta[key].properties.dtype
            if layer is None:
                offsets, sizes = (0,) * len(size), size
            else:
                offsets, sizes = (layer,) + (0,) * (len(size) - 1), (1,) + size[1:]
            chunks[key] = (offsets, sizes)
            out[key] = torch.empty(sizes, dtype=dtype, device="meta" if meta else "cpu")
        if meta:
            return [out[key][0] if layer is not None else out[key] for key, layer in requests]
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=FileSystemReader(self.path), planner=_ChunkLoadPlanner(chunks), no_dist=True)
        return [out[key][0] if layer is not None else out[key] for key, layer in requests]


def _iter_model_tensors(sharded) -> Iterator[tuple[str, Optional[int], torch.Tensor]]:
    """(checkpoint key, layer or None, the parameter tensor) for a one-process GPTModel."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded.values():
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if "_extra_state" in value.key or value.data is None or not value.data.is_floating_point():
                continue
            prepended = getattr(value, "prepend_axis_num", None)
            if prepended is None:  # factories (SwiGLU fc1) carry the layer offset in their builder
                layer = _factory_layer(value)
            else:
                layer = value.global_offset[0] if prepended else None
            yield value.key, layer, value.data
        elif isinstance(value, dict):
            yield from _iter_model_tensors(value)


def _factory_layer(factory) -> Optional[int]:
    built = factory.build_fn(factory.key, factory.data, factory.replica_id, factory.flattened_range)
    if isinstance(built, dict):
        built = list(built.values())
    first = built[0] if isinstance(built, (list, tuple)) else built
    return first.global_offset[0] if first.prepend_axis_num else None


@torch.no_grad()
def write_model_checkpoint(root: str, model: ModelConfig, get_tensor: Callable[[str, Optional[int]], torch.Tensor],
                           dtype: torch.dtype,
                           filled: Callable[[str, Optional[int]], None] = lambda key, layer: None) -> str:
    """Build our GPTModel on this one process, fill every parameter from ``get_tensor(checkpoint
    key, layer or None)`` (which converts from the source), and save it as step 0 (model only),
    published like a training save. ``filled(key, layer)`` is called after each parameter."""
    from megatron.core import dist_checkpointing

    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.models.gpt import build_model_chunks

    train = TrainConfig(precision="bf16" if dtype == torch.bfloat16 else "fp32")
    (gpt,) = build_model_chunks(model, ParallelConfig(), train, seq_length=None, seed=0)
    sharded = gpt.sharded_state_dict()
    for key, layer, param in _iter_model_tensors(sharded):
        value = get_tensor(key, layer)
        if tuple(value.shape) != tuple(param.shape):
            where = f"layer {layer} " if layer is not None else ""
            raise CheckpointFormatError(f"shape mismatch for {where}{key}: source gives {tuple(value.shape)}, "
                                        f"the model config expects {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))
        filled(key, layer)
    final = iteration_dir(root, 0)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    dist_checkpointing.save({"model": sharded, "train_state": {"step": 0, "consumed_samples": 0},
                             "parallel": {"converted": True}}, partial)
    publish(partial, final, root)
    write_model_config(root, model)
    return final


def load_megatron_model(root: str, dtype: torch.dtype = torch.float32):
    """Our training model (megatron-core GPTModel, TP = PP = 1) with a checkpoint's weights, for
    evaluation in one process. Call inside ``distributed.single_process()``."""
    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.models.gpt import build_model_chunks

    model = read_model_config(root)
    train = TrainConfig(precision="bf16" if dtype == torch.bfloat16 else "fp32")
    chunks = build_model_chunks(model, ParallelConfig(), train, seq_length=None, seed=0)
    ctx = _OneProcess()
    Checkpointer(ctx, None).load(root, chunks, optimizer=None, scheduler=None, with_optimizer=False)
    chunks[0].eval()
    return chunks[0]


class _OneProcess:
    """The facts Checkpointer.load needs about the layout, for one process."""

    tp = pp = dp = cp = 1
    tp_rank = pp_rank = dp_rank = cp_rank = 0
    is_main = True
