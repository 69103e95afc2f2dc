"""Typed configs of the text encoder and the video VAE; bad values get a one-line error naming the field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from magi_train.errors import ConfigError, check, check_choice

TEXT_ENCODER_KINDS = ("t5", "hash")
VAE_KINDS = ("small", "magi")
# Both spellings are accepted: MAGI-1 configs say "torch.bfloat16", people say "bf16".
_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "torch.float32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
}
# Per-kind defaults of fields left as None.
_TEXT_DEFAULTS = {"t5": {"max_length": 800}, "hash": {"max_length": 32, "dim": 64}}


def normalise_dtype(value: str, field: str) -> str:
    check_choice(value, field, tuple(_DTYPE_ALIASES))
    return _DTYPE_ALIASES[value]


def _positive_int(value, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{field}: must be a positive integer, got {value!r}")


def _power_of_two(value: int, field: str) -> None:
    _positive_int(value, field)
    check(value & (value - 1) == 0, field, f"must be a power of two, got {value}")


@dataclass
class TextEncoderConfig:
    kind: str = "hash"                 # "t5": T5 v1.1 encoder from a local directory; "hash": offline n-gram encoder
    path: Optional[str] = None         # t5_pretrained: the T5 directory (or its parent holding t5-v1_1-xxl/)
    max_length: Optional[int] = None   # tokens per caption after padding; None: 800 for t5, 32 for hash
    dim: Optional[int] = None          # embedding width; None: the T5 checkpoint's d_model, 64 for hash
    dtype: str = "float32"             # weights of the T5 model: float32 | bfloat16 (outputs are float32)
    device: str = "cpu"                # t5_device: where the T5 model runs (outputs come back on it)
    batch_size: int = 8                # prompts per forward pass
    cache_size: int = 256              # distinct prompts kept (LRU); 0 disables the cache
    clean_captions: bool = True        # clean text as MAGI-1's T5Embedder does (ftfy, BeautifulSoup, regexes)
    seed: int = 0                      # hash: changes every token vector (a different, equally valid encoder)

    def __post_init__(self) -> None:
        check_choice(self.kind, "text_encoder.kind", TEXT_ENCODER_KINDS)
        if self.kind == "t5":
            check(bool(self.path), "text_encoder.path", "kind='t5' needs the local T5 directory (t5_pretrained)")
        for name, value in _TEXT_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _positive_int(self.max_length, "text_encoder.max_length")
        if self.dim is not None:
            _positive_int(self.dim, "text_encoder.dim")
        self.dtype = normalise_dtype(self.dtype, "text_encoder.dtype")
        _positive_int(self.batch_size, "text_encoder.batch_size")
        check(isinstance(self.cache_size, int) and self.cache_size >= 0, "text_encoder.cache_size",
              f"must be an integer >= 0, got {self.cache_size!r}")


@dataclass
class VAEConfig:
    kind: str = "small"                # "magi": MAGI-1 ViT VAE from vae_pretrained; "small": the demo's conv VAE
    path: Optional[str] = None         # vae_pretrained (magi) or a save_pretrained directory (small); None: new small
    scale_factor: Optional[float] = None  # latent = mean * scale_factor; None: the model's (0.18215 for MAGI-1)
    temporal_downsample_factor: Optional[int] = None  # None: the model's; when set it must match the weights
    spatial_downsample_factor: Optional[int] = None   # None: the model's; when set it must match the weights
    latent_channels: Optional[int] = None             # None: the model's; when set it must match the weights
    base_channels: int = 64            # small: conv width of a new model
    temporal_mixing: bool = False      # small: a temporal conv at latent resolution in a new model
    dtype: str = "float32"             # float32 | bfloat16
    device: str = "cpu"
    # Tiling: clips larger than a tile are encoded/decoded tile by tile, overlaps blended linearly.
    tiling: bool = True
    tile_height: int = 256             # pixels; MAGI-1 uses 256
    tile_width: int = 256
    tile_frames: int = 12              # video frames; MAGI-1 uses fps // 2 (12 at 24 fps)
    spatial_overlap: float = 0.25      # fraction of a tile shared with its neighbour (MAGI-1: 0.25)
    temporal_overlap: float = 0.0      # MAGI-1: 0 (tiles end-to-end in time)

    def __post_init__(self) -> None:
        check_choice(self.kind, "vae.kind", VAE_KINDS)
        if self.kind == "magi":
            check(bool(self.path), "vae.path", "kind='magi' needs the local VAE directory (vae_pretrained)")
        if self.scale_factor is not None:
            check(isinstance(self.scale_factor, (int, float)) and self.scale_factor > 0, "vae.scale_factor",
                  f"must be a number > 0, got {self.scale_factor!r}")
        if self.temporal_downsample_factor is not None:
            _power_of_two(self.temporal_downsample_factor, "vae.temporal_downsample_factor")
        if self.spatial_downsample_factor is not None:
            _power_of_two(self.spatial_downsample_factor, "vae.spatial_downsample_factor")
        if self.latent_channels is not None:
            _positive_int(self.latent_channels, "vae.latent_channels")
        _positive_int(self.base_channels, "vae.base_channels")
        self.dtype = normalise_dtype(self.dtype, "vae.dtype")
        for name in ("tile_height", "tile_width", "tile_frames"):
            _positive_int(getattr(self, name), f"vae.{name}")
        for name in ("spatial_overlap", "temporal_overlap"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and 0.0 <= value < 1.0, f"vae.{name}",
                  f"must be in [0, 1), got {value!r}")


def configs_from_runtime_keys(keys: dict) -> tuple[TextEncoderConfig, VAEConfig]:
    """Encoder configs from MAGI-1 run-time keys (t5_pretrained, t5_device, vae_pretrained, scale_factor,
    temporal_downsample_factor), as found in its example/*/config.json runtime_config."""
    text = TextEncoderConfig(kind="t5", path=keys["t5_pretrained"], device=keys.get("t5_device", "cpu"),
                             max_length=keys.get("caption_max_length", 800))
    vae = VAEConfig(kind="magi", path=keys["vae_pretrained"], scale_factor=keys.get("scale_factor", 0.18215),
                    temporal_downsample_factor=keys.get("temporal_downsample_factor", 4),
                    tile_frames=max(keys.get("fps", 24) // 2, 1))
    return text, vae
