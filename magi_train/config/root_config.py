"""MagiConfig: the root of the typed config tree, and the strict builder that turns hydra's dict into it.

Hydra composes yaml groups and command-line overrides into a plain dict; `build_config` walks it against the
dataclass annotations, so an unknown key or a value of the wrong type fails at start with one line naming the
key (`train.optimizer.lr: expected a number, got 'fast'`). It works for every helper's dataclass (unions,
optionals, lists and tuples included), which OmegaConf's structured configs do not. Cross-field checks that need
the world size live in `validate_config`."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from magi_train.data.config import DataConfig
from magi_train.encoders.config import TextEncoderConfig, VAEConfig

from magi_train.errors import ConfigError, check, check_choice
from .distill_config import DistillConfig, validate_distill
from .model_config import PRESETS, ModelConfig
from .parallel_config import ParallelConfig
from .train_config import TrainConfig

RESUME_CHOICES = ("auto", "none")


@dataclass
class SyntheticDataConfig:
    """In-memory random latents and caption embeddings (tests, smoke runs, overfitting); data.kind=synthetic."""

    kind: str = "synthetic"
    num_samples: int = 64                 # samples in the whole set (shared by all ranks, split round-robin)
    batch_size: int = 2                   # per rank
    latent_frames: int = 12               # must be a multiple of model.chunk_width
    latent_height: int = 8                # multiples of model.patch_size
    latent_width: int = 8
    text_length: int = 8                  # caption tokens (the last ones are padding)
    num_patterns: int = 4                 # distinct moving patterns; a sample's caption names its pattern
    noise_level: float = 0.1              # per-sample noise added to its pattern
    shuffle: bool = True                  # reshuffle each epoch (seeded by seed + epoch)
    seed: int = 0
    val_num_samples: int = 8              # held-out samples (another seed) for validation

    def __post_init__(self) -> None:
        check(self.kind == "synthetic", "data.kind", f"got {self.kind!r}")
        for name in ("num_samples", "batch_size", "latent_frames", "latent_height", "latent_width", "text_length",
                     "num_patterns", "val_num_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"data.{name}: must be a positive integer, got {v!r}")
        check(self.noise_level >= 0, "data.noise_level", f"must be >= 0, got {self.noise_level}")


@dataclass
class EncodersConfig:
    """Encoders used in the training process; only data.kind=raw needs them (latent shards are pre-encoded)."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


@dataclass
class MagiConfig:
    name: str = "magi"                    # run name: the run lives in {output_dir}/{name}
    output_dir: str = "runs"
    resume: str = "auto"                  # auto: latest complete checkpoint of the run if any; none; or a path
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = field(default_factory=SyntheticDataConfig)   # DataConfig (raw | latent) or SyntheticDataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)   # train.objective=shortcut_distill

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name",
              f"must be a non-empty name without '/', got {self.name!r}")


DATA_KINDS = {"synthetic": SyntheticDataConfig, "raw": DataConfig, "latent": DataConfig}


# ----------------------------------------------------------------------------- strict builder
def _close(key: str, known: dict, hints: dict, dotted: str) -> str:
    """A suggestion for a misspelt or misplaced key: a close name here, or the same name one level down."""
    near = difflib.get_close_matches(key, list(known), n=1)
    if near:
        return f"; did you mean {dotted}{near[0]}?"
    for name in known:
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}:
            return f"; did you mean {dotted}{name}.{key}?"
    return ""


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                "list": "a list", "tuple": "a list", "dict": "a mapping"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _convert(value, tp, key: str):
    """value (plain python from yaml) -> value of annotation tp, or ConfigError naming key."""
    if isinstance(value, str) and value == "???":
        raise ConfigError(f"{key}: missing mandatory value; set {key}=...")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        accepted = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{key}: expected {accepted}, got {value!r}")
    if value is None:
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {list(value)!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain dict: unknown keys and wrong types raise ConfigError naming the key;
    missing keys keep their defaults; the dataclass's own __post_init__ checks run last."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (prefix + ".") if prefix else ""
    for k in values:
        if k not in known:
            raise ConfigError(f"{dotted}{k}: unknown key{_close(str(k), known, hints, dotted)} (accepted keys: "
                              f"{', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        tp = hints[name]
        if name in values:
            kwargs[name] = _convert(values[name], tp, dotted + name)
        elif dataclasses.is_dataclass(tp) and f.default_factory is tp:
            kwargs[name] = build_dataclass(tp, {}, dotted + name)   # defaults, checked under the right key
    return cls(**kwargs)


def preset_values(model: dict) -> dict:
    """{'preset': NAME, **keys} -> the named size's fields (model_config.PRESETS, the one registry of sizes) with
    the given keys on top."""
    model = dict(model)
    name = model.pop("preset")
    check_choice(name, "model.preset", tuple(PRESETS))
    return {**PRESETS[name], **model}


def build_config(values: dict) -> MagiConfig:
    """Plain dict (hydra's composition, as a container) -> MagiConfig; raises ConfigError naming the key."""
    values = dict(values)
    if isinstance(values.get("model"), dict) and "preset" in values["model"]:
        values["model"] = preset_values(values["model"])
    data = values.pop("data", None)
    cfg_values = {k: v for k, v in values.items()}
    root = build_dataclass(MagiConfig, cfg_values)
    if data is not None:
        if not isinstance(data, dict):
            raise ConfigError(f"data: expected a mapping, got {data!r}")
        kind = data.get("kind", "latent")
        if kind not in DATA_KINDS:
            raise ConfigError(f"data.kind: got {kind!r}, accepted values are {', '.join(map(repr, DATA_KINDS))}")
        root.data = build_dataclass(DATA_KINDS[kind], data, "data")
    return root


# ----------------------------------------------------------------------------- cross-field checks
def latent_frames_of(cfg: MagiConfig) -> Optional[int]:
    """Latent frames per training sample when the config fixes them (None: raw video or variable length)."""
    data = cfg.data
    if isinstance(data, SyntheticDataConfig):
        return data.latent_frames
    if isinstance(data, DataConfig) and data.kind == "latent":
        return data.num_frames
    return None


def validate_config(cfg: MagiConfig, world_size: int = 1) -> None:
    """Checks that span sections or need the world size; one-line ConfigError naming the field."""
    cfg.parallel.validate_world(world_size)
    cfg.parallel.validate_model(cfg.model)
    frames = latent_frames_of(cfg)
    if frames is not None:
        check(frames % cfg.model.chunk_width == 0, "data.num_frames" if isinstance(cfg.data, DataConfig)
              else "data.latent_frames",
              f"{frames} latent frames is not a multiple of model.chunk_width={cfg.model.chunk_width}")
    if isinstance(cfg.data, SyntheticDataConfig):
        p = cfg.model.patch_size
        for name in ("latent_height", "latent_width"):
            v = getattr(cfg.data, name)
            check(v % p == 0, f"data.{name}", f"{v} is not a multiple of model.patch_size={p}")
    if isinstance(cfg.data, DataConfig) and cfg.data.kind == "raw" and cfg.encoders.text.dim is not None:
        check(cfg.encoders.text.dim == cfg.model.caption_channels, "encoders.text.dim",
              f"{cfg.encoders.text.dim} differs from model.caption_channels={cfg.model.caption_channels}")
    from magi_train.precision.fp8_training import resolve_layer_spec

    resolve_layer_spec(cfg.train.fp8, cfg.model.layer_spec)   # model.layer_spec and train.fp8 agree
    if cfg.train.init_from:
        check(cfg.train.init_from.strip() != "", "train.init_from", "must be a path or null")
    if cfg.resume not in RESUME_CHOICES:
        check(cfg.resume.strip() != "", "resume", "must be 'auto', 'none' or a checkpoint directory")
    validate_distill(cfg)
    from .deepspeed_config import validate_deepspeed

    validate_deepspeed(cfg)


__all__ = ["MagiConfig", "SyntheticDataConfig", "EncodersConfig", "build_config", "build_dataclass",
           "validate_config", "latent_frames_of"]
