"""Typed config tree; hydra fills it (see configs/)."""
from .errors import ConfigError, check, check_choice
from .model_config import ModelConfig, PRESETS, model_preset
