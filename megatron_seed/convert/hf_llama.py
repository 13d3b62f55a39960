"""Hugging Face Llama <-> megatron-seed: the config mapping and the declarative key map.

Our checkpoints hold megatron-core's *global* tensors (layout-free): per-layer tensors are
stacked on a leading layer axis, ``linear_qkv`` interleaves heads per query group
``[q_0 .. q_{r-1}, k, v]`` for each of the G groups (r = heads / groups), and ``linear_fc1`` is
``[gate; up]``. Everything else is a plain copy. The same table drives both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_seed.checkpoint.reader import CheckpointFormatError
from megatron_seed.config.schema import ModelConfig


class ConversionError(CheckpointFormatError):
    """The checkpoint cannot be converted; the message says why and what is supported. (A
    ValueError, as is its base: ``except CheckpointFormatError`` also catches what the checkpoint
    reader and writer raise for a missing tensor or a shape mismatch.)"""


@dataclass(frozen=True)
class KeyMapping:
    ours: str                  # megatron-core checkpoint key (layer axis first when per_layer)
    hf: tuple[str, ...]        # HF tensor names; "{i}" is the layer index
    kind: str = "copy"         # copy | qkv | fc1
    per_layer: bool = True


KEY_MAP = (
    KeyMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), per_layer=False),
    KeyMapping("decoder.final_layernorm.weight", ("model.norm.weight",), per_layer=False),
    KeyMapping("output_layer.weight", ("lm_head.weight",), per_layer=False),  # absent when tied
    KeyMapping("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
               ("model.layers.{i}.input_layernorm.weight",)),
    KeyMapping("decoder.layers.self_attention.linear_qkv.weight",
               ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                "model.layers.{i}.self_attn.v_proj.weight"), kind="qkv"),
    KeyMapping("decoder.layers.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",)),
    KeyMapping("decoder.layers.mlp.linear_fc1.layer_norm_weight",
               ("model.layers.{i}.post_attention_layernorm.weight",)),
    KeyMapping("decoder.layers.mlp.linear_fc1.weight",
               ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), kind="fc1"),
    KeyMapping("decoder.layers.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)),
)
MAPPING_BY_OURS = {m.ours: m for m in KEY_MAP}


def hf_names(mapping: KeyMapping, layer: int | None) -> list[str]:
    return [name.format(i=layer) for name in mapping.hf]


def to_ours(mapping: KeyMapping, tensors: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """HF tensors of one layer (or a global tensor) -> our tensor for that layer."""
    if mapping.kind == "copy":
        return tensors[0]
    if mapping.kind == "fc1":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    groups, d, h = model.num_query_groups, model.head_dim, model.hidden_size
    per_group = model.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, h)
    k = k.reshape(groups, d, h)
    v = v.reshape(groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def to_hf(mapping: KeyMapping, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    """Our tensor for one layer -> the HF tensors, in ``mapping.hf`` order."""
    if mapping.kind == "copy":
        return [tensor]
    if mapping.kind == "fc1":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    groups, d, h = model.num_query_groups, model.head_dim, model.hidden_size
    per_group = model.num_attention_heads // groups
    grouped = tensor.reshape(groups, (per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return [q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()]


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def model_config_from_hf(cfg: dict) -> ModelConfig:
    """Our ModelConfig from an HF ``config.json``; unsupported features fail with a reason."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ConversionError(f"model_type {cfg.get('model_type')!r} / architectures {archs} is not supported: "
                              f"this converter handles Llama-family checkpoints ({', '.join(SUPPORTED_ARCHITECTURES)})")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']} (only silu/SwiGLU)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (the model has no biases)")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
                                          if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        problems.append(f"rope scaling {scaling} (only plain RoPE)")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {cfg['hidden_size']}")
    if problems:
        raise ConversionError("unsupported in this checkpoint: " + "; ".join(problems))
    return ModelConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 8192),
        rotary_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def hf_config_from_model(model: ModelConfig, dtype: torch.dtype, base: dict | None = None) -> dict:
    """An HF LlamaConfig dict for our model; ``base`` (the original config, when the checkpoint
    came from HF) keeps its other fields such as token ids."""
    cfg = dict(base or {})
    cfg.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim,
        "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_theta": model.rotary_base, "rope_scaling": None,
        "torch_dtype": str(dtype).replace("torch.", ""),
    })
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    return cfg
