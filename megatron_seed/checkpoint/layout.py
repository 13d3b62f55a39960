"""The checkpoint directory layout, and the one step that makes a saved iteration visible.

Layout under a checkpoint root (``train.save``, or what ``tools/convert_checkpoint.py`` writes)::

    model_config.json      the ModelConfig (needed to read without a run config)
    tokenizer/             tokenizer files, when known (HF tokenizer files or the "byte" marker)
    hf_config/             config.json / generation_config.json of the HF model it came from
    iter_0000010/          a complete checkpoint (megatron-core's metadata + shards + common.pt)
    latest                 text: the name of the newest complete checkpoint
    iter_0000020.partial/  a save in progress (or killed); never loaded

Every writer (training's Checkpointer and the converter) saves into ``iter_N.partial`` and then
calls ``publish``: rename it to ``iter_N``, fsync the root, replace ``latest`` atomically
(write-to-temp + fsync + rename). A process killed at any point leaves either the old ``latest``
or the new one, each naming a complete directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

from megatron_seed.config.schema import ModelConfig

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
LATEST = "latest"


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


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one)."""
    if os.path.isfile(os.path.join(root, "metadata.json")):
        return root
    marker = os.path.join(root, LATEST)
    if os.path.isfile(marker):
        with open(marker) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, "metadata.json")):
            return path
    complete = sorted(d for d in os.listdir(root) if d.startswith("iter_") and not d.endswith(".partial")
                      and os.path.isfile(os.path.join(root, d, "metadata.json"))) if os.path.isdir(root) else []
    return os.path.join(root, complete[-1]) if complete else None


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: str, final: str, root: str) -> None:
    """Make a finished save visible: ``partial`` (complete on disk) becomes ``final`` and
    ``root/latest`` names it. The rename is made durable (fsync of ``root``) before ``latest``
    points at it. Called by one process (rank 0) after every rank has finished writing."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    fsync_dir(root)
    atomic_write(os.path.join(root, LATEST), os.path.basename(final) + "\n")
