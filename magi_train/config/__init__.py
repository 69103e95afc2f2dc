"""Typed config tree; hydra fills it (see configs/)."""
from magi_train.errors import ConfigError, check, check_choice
from .model_config import ModelConfig, PRESETS, model_preset
from .parallel_config import ParallelConfig
from .train_config import (CheckpointConfig, EMAConfig, FlowMatchingConfig, OptimizerConfig, ScheduleConfig,
                           TrainConfig, ValidationConfig, WandbConfig)

# The root tree (root_config) pulls in the data and encoder configs, and through them torch: loaded on first use,
# so that importing a config module stays light and free of import cycles.
_ROOT_EXPORTS = ("EncodersConfig", "MagiConfig", "SyntheticDataConfig", "build_config", "build_dataclass",
                 "latent_frames_of", "validate_config")


def __getattr__(name: str):
    if name in _ROOT_EXPORTS:
        from . import root_config
        return getattr(root_config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
