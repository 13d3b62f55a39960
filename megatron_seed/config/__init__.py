from megatron_seed.config.loading import load_config, to_dict
from megatron_seed.config.presets import MODEL_PRESETS, RUN_PRESETS, run_preset
from megatron_seed.config.schema import (
    ConfigError, DataConfig, ModelConfig, OptimizerConfig, ParallelConfig, RunConfig, TrainConfig,
)

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "RunConfig",
    "TrainConfig", "MODEL_PRESETS", "RUN_PRESETS", "load_config", "run_preset", "to_dict",
]
