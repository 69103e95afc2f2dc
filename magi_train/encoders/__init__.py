"""Caption encoders (T5 from a local directory, an offline hash encoder) and video VAEs (MAGI-1's ViT VAE from a
local directory, a small conv VAE), each chosen by config behind one interface."""
from .build import build_text_encoder, build_vae, tiling_options, vae_kind_of
from .config import TextEncoderConfig, VAEConfig, configs_from_runtime_keys
from .null_caption import NULL_CAPTION_TOKENS, is_null_caption, null_caption_mask, substitute_null_caption
from .special_tokens import load_special_tokens, prepend_token
from .text_base import TextEncoder, clean_caption
from .vae_base import TilingOptions, VideoVAE

__all__ = [
    "build_text_encoder", "build_vae", "tiling_options", "vae_kind_of",
    "TextEncoderConfig", "VAEConfig", "configs_from_runtime_keys",
    "NULL_CAPTION_TOKENS", "is_null_caption", "null_caption_mask", "substitute_null_caption",
    "load_special_tokens", "prepend_token",
    "TextEncoder", "clean_caption", "TilingOptions", "VideoVAE",
]
