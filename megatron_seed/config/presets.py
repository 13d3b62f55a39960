"""Named model and run presets. Full-size numbers come from the published model configs."""

from __future__ import annotations

import copy

from megatron_seed.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig

MODEL_PRESETS: dict[str, ModelConfig] = {
    # For tests and the CPU demo: 2 layers, GQA (4 heads, 2 KV groups), untied; byte vocabulary.
    "tiny": ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
        num_query_groups=2, vocab_size=272, max_position_embeddings=1024,
        rotary_base=500000.0, norm_epsilon=1e-6, tie_embeddings=False,
    ),
    # The 100M-parameter shape used by bench/step_time.py.
    "llama_100m": ModelConfig(
        num_layers=12, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12,
        num_query_groups=4, vocab_size=32000, max_position_embeddings=2048,
        rotary_base=500000.0, norm_epsilon=1e-6, tie_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json.
    "smollm2_135m": ModelConfig(
        num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
        num_query_groups=3, vocab_size=49152, max_position_embeddings=8192,
        rotary_base=100000.0, norm_epsilon=1e-5, tie_embeddings=True,
    ),
    # Seed-Coder-8B (Llama-3 structure; 32 layers as in the public HF config).
    "seed_coder_8b": ModelConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=155136, max_position_embeddings=32768,
        rotary_base=500000.0, norm_epsilon=1e-6, tie_embeddings=False,
    ),
}


def _run(name: str, data: DataConfig, train: TrainConfig) -> RunConfig:
    return RunConfig(name=name, model=copy.deepcopy(MODEL_PRESETS[name]), data=data, train=train)


RUN_PRESETS: dict[str, RunConfig] = {
    "tiny": _run("tiny", DataConfig(seq_length=64, mock=True),
                 TrainConfig(steps=10, micro_batch_size=2, global_batch_size=4, precision="fp32")),
    "llama_100m": _run("llama_100m", DataConfig(seq_length=512, mock=True),
                       TrainConfig(steps=10, micro_batch_size=4, global_batch_size=4)),
    "smollm2_135m": _run("smollm2_135m", DataConfig(seq_length=2048),
                         TrainConfig(steps=1000, micro_batch_size=1, global_batch_size=64)),
    # Seed-Coder regular pretraining: 8K context, lr 3e-4 (paper); batch and warmup are our choice.
    "seed_coder_8b": _run("seed_coder_8b", DataConfig(seq_length=8192),
                          TrainConfig(steps=100000, micro_batch_size=1, global_batch_size=1024)),
}
RUN_PRESETS["seed_coder_8b"].optimizer.warmup_steps = 2000


def run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        from megatron_seed.config.schema import ConfigError

        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(RUN_PRESETS)}")
    return copy.deepcopy(RUN_PRESETS[name])
