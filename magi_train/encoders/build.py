"""build_text_encoder / build_vae: the one place a config turns into an encoder."""
from __future__ import annotations

from magi_train.dtypes import DTYPES

from .config import TextEncoderConfig, VAEConfig
from .text_base import TextEncoder
from .vae_base import TilingOptions, VideoVAE


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    if cfg.kind == "t5":
        from .text_t5 import T5TextEncoder
        return T5TextEncoder(cfg)
    from .text_hash import HashTextEncoder
    return HashTextEncoder(cfg)


def tiling_options(cfg: VAEConfig) -> TilingOptions:
    return TilingOptions(enabled=cfg.tiling, height=cfg.tile_height, width=cfg.tile_width, frames=cfg.tile_frames,
                         spatial_overlap=cfg.spatial_overlap, temporal_overlap=cfg.temporal_overlap)


def _check_matches(model: VideoVAE, cfg: VAEConfig) -> None:
    for field, have in (("temporal_downsample_factor", model.temporal_factor),
                        ("spatial_downsample_factor", model.spatial_factor),
                        ("latent_channels", model.latent_channels)):
        want = getattr(cfg, field)
        if want is not None and want != have:
            raise ValueError(f"vae.{field}: config says {want} but the weights in {cfg.path} have {have}")


def build_vae(cfg: VAEConfig) -> VideoVAE:
    tiling = tiling_options(cfg)
    dtype = DTYPES[cfg.dtype]
    if cfg.kind == "magi":
        from .vae_magi import MAGI_SCALE_FACTOR, load_magi_vae
        scale = cfg.scale_factor if cfg.scale_factor is not None else MAGI_SCALE_FACTOR
        model = load_magi_vae(cfg.path, scale, tiling, dtype=dtype, device=cfg.device)
    else:
        from .vae_small import SmallVAE, SmallVAEArch, load_small_vae
        if cfg.path:
            model = load_small_vae(cfg.path, tiling)
        else:  # a new, untrained model (what the VAE training script starts from)
            arch = SmallVAEArch(latent_channels=cfg.latent_channels or 8,
                                spatial_factor=cfg.spatial_downsample_factor or 4,
                                temporal_factor=cfg.temporal_downsample_factor or 1,
                                base_channels=cfg.base_channels, temporal_mixing=cfg.temporal_mixing)
            model = SmallVAE(arch, tiling=tiling)
        if cfg.scale_factor is not None:
            model.scale_factor = float(cfg.scale_factor)
        model = model.to(device=cfg.device, dtype=dtype)
    _check_matches(model, cfg)
    return model


def vae_kind_of(path: str) -> str:
    """"small" or "magi": which kind of VAE a weights directory holds (read from its config.json)."""
    import json
    import os

    from .vae_small import FORMAT
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"VAE config not found: {config_path}")
    with open(config_path) as f:
        return "small" if json.load(f).get("format") == FORMAT else "magi"
