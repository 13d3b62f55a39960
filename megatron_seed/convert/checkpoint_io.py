"""Our checkpoints as global tensors: read layer by layer, written from a full set of tensors.

A checkpoint directory (what ``train.save`` and ``tools/convert_checkpoint.py`` write)::

    model_config.json     the ModelConfig (needed to read without a run config)
    tokenizer/            tokenizer files, when known (HF tokenizer files or the "byte" marker)
    hf_config/            config.json / generation_config.json of the HF model it came from
    iter_0000000/         megatron-core dist_checkpointing (global tensors, any TP/PP)
    latest

Reading asks torch.distributed.checkpoint (the format under megatron-core's ``torch_dist``
backend) for one layer's box of each layer-stacked tensor, so peak memory is about one layer
(plus embeddings), whatever TP/PP the checkpoint was saved with. Writing goes through megatron-core's own GPTModel sharded state
dict (built on one process), so key names and layouts are exactly what training loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Callable, Iterator, Optional

import torch

from megatron_seed.config.schema import ModelConfig
from megatron_seed.convert.hf_llama import KEY_MAP, ConversionError, KeyMapping

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def write_model_config(root: str, model: ModelConfig) -> None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(model), f, indent=2)


def read_model_config(root: str) -> ModelConfig:
    path = os.path.join(root, MODEL_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {root} is not a megatron-seed checkpoint directory "
                                "(train.save or tools/convert_checkpoint.py write one)")
    with open(path) as f:
        return ModelConfig(**json.load(f))


def copy_tokenizer_files(source: Optional[str], root: str) -> Optional[str]:
    """Copy a tokenizer (a directory of HF/sentencepiece files or a single file) to ROOT/tokenizer."""
    if not source:
        return None
    target = os.path.join(root, TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    if source == "byte":
        with open(os.path.join(target, "byte"), "w") as f:
            f.write("ByteTokenizer: no files needed\n")
        return target
    if os.path.isdir(source):
        copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
        for name in copied:
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))
        return target if copied else None
    if os.path.isfile(source) and source.endswith((".json", ".model")):
        name = "tokenizer.json" if source.endswith(".json") else "tokenizer.model"
        shutil.copy2(source, os.path.join(target, name))
        return target
    return None


def tokenizer_spec(root: str) -> Optional[str]:
    """The load_tokenizer spec of the tokenizer stored with a checkpoint, if any."""
    folder = os.path.join(root, TOKENIZER_DIR)
    if os.path.exists(os.path.join(folder, "byte")):
        return "byte"
    return folder if os.path.isdir(folder) and os.listdir(folder) else None


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

        from megatron_seed.training.checkpointing import latest_checkpoint

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
                raise ConversionError(f"{self.path} has no tensor {key!r}")
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

    def iter_hf_tensors(self, to_hf: Callable, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for the whole model: globals first, then layer by layer. With ``meta``
        the same sequence as meta tensors (the layout of an export, before reading anything)."""
        from megatron_seed.convert.hf_llama import hf_names

        for mapping in (m for m in KEY_MAP if not m.per_layer):
            if mapping.ours == "output_layer.weight" and self.model.tie_embeddings:
                continue
            (tensor,) = self.read([(mapping.ours, None)], meta)
            yield from zip(hf_names(mapping, None), to_hf(mapping, tensor, self.model))
        per_layer = [m for m in KEY_MAP if m.per_layer]
        for layer in range(self.model.num_layers):
            tensors = self.read([(m.ours, layer) for m in per_layer], meta)
            for mapping, tensor in zip(per_layer, tensors):
                yield from zip(hf_names(mapping, layer), to_hf(mapping, tensor, self.model))


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
def write_checkpoint(root: str, model: ModelConfig, get_tensor: Callable[[KeyMapping, Optional[int]], torch.Tensor],
                     dtype: torch.dtype, progress: Callable[[str], None] = lambda s: None) -> str:
    """Build our GPTModel on this one process, fill every parameter from ``get_tensor(mapping,
    layer)`` (which converts from the source), and save it as step 0 (model only)."""
    from megatron.core import dist_checkpointing

    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.convert.hf_llama import MAPPING_BY_OURS
    from megatron_seed.models.gpt import build_model_chunks
    from megatron_seed.training.checkpointing import _atomic_write, iteration_dir

    train = TrainConfig(precision="bf16" if dtype == torch.bfloat16 else "fp32")
    (gpt,) = build_model_chunks(model, ParallelConfig(), train, seq_length=None, seed=0)
    sharded = gpt.sharded_state_dict()
    filled = 0
    for key, layer, param in _iter_model_tensors(sharded):
        mapping = MAPPING_BY_OURS.get(key)
        if mapping is None:
            raise ConversionError(f"no conversion rule for our tensor {key!r}")
        value = get_tensor(mapping, layer)
        if tuple(value.shape) != tuple(param.shape):
            where = f"layer {layer} " if layer is not None else ""
            raise ConversionError(f"shape mismatch for {where}{key}: source gives {tuple(value.shape)}, "
                                  f"the model config expects {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))
        filled += 1
        if layer is not None and key == KEY_MAP[-1].ours:
            progress(f"layer {layer + 1}/{model.num_layers}")
    final = iteration_dir(root, 0)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    dist_checkpointing.save({"model": sharded, "train_state": {"step": 0, "consumed_samples": 0},
                             "parallel": {"converted": True}}, partial)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    _atomic_write(os.path.join(root, "latest"), os.path.basename(final) + "\n")
    write_model_config(root, model)
    return final


def load_megatron_model(root: str, dtype: torch.dtype = torch.float32):
    """Our training model (megatron-core GPTModel, TP = PP = 1) with a checkpoint's weights, for
    evaluation in one process. Call inside ``distributed.single_process()``."""
    from megatron_seed.config.schema import ParallelConfig, TrainConfig
    from megatron_seed.models.gpt import build_model_chunks
    from megatron_seed.training.checkpointing import Checkpointer

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
