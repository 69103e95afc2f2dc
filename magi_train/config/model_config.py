"""ModelConfig: the MAGI-1 DiT's shape, with the released sizes as presets."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from magi_train.errors import ConfigError, check, check_choice

ATTENTION_BACKENDS = ("auto", "reference", "sdpa_chunked", "flex", "flash_attn", "cudnn_fp8")
LAYER_SPECS = ("auto", "local", "megatron", "te")


@dataclass
class ModelConfig:
    # --- shape (names follow MAGI-1's model_config json) ---
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: int = 2          # GQA: number of K/V heads
    kv_channels: int = 32              # head dimension
    gated_linear_unit: bool = False    # True: SwiGLU (24B); False: exact GELU (4.5B)
    in_channels: int = 16
    out_channels: int = 16
    half_channel_vae: bool = False     # 16-ch latent duplicated to 32 at input, first half of the output kept
    x_rescale_factor: float = 1.0      # input scaled by it, output divided by it
    patch_size: int = 2
    t_patch_size: int = 1
    caption_channels: int = 64         # text-encoder width (4096 for T5 v1.1 XXL)
    caption_max_length: int = 16       # rows of the learned null caption (800 in MAGI-1)
    null_caption_tokens: int = 50      # tokens of the null caption that are attended to (MAGI-1 uses 50)
    cond_hidden_ratio: float = 0.25    # condition width = hidden_size * ratio
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True    # zero-centred gamma for q/k/post/final norms
    distill: bool = False              # step-size (dt) conditioning of distilled models
    # --- video layout ---
    chunk_width: int = 6               # latent frames per chunk
    rope_reference_tokens: int = 16    # spatial RoPE positions are rescaled to this square token grid
    # --- implementation choices (not part of the checkpoint) ---
    attention_backend: str = "auto"     # auto: the fastest exact backend for the device (model/attention.py)
    layer_spec: str = "auto"           # auto: megatron linears when parallel.tp > 1, else local; te: Transformer Engine
    params_dtype: str = "float32"      # float32 | bfloat16

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "in_channels", "out_channels", "patch_size", "t_patch_size",
                  "caption_channels", "caption_max_length", "chunk_width"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model.{f}: must be a positive integer, got {v!r}")
        check(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
              f"must divide num_attention_heads={self.num_attention_heads}, got {self.num_query_groups}")
        check(self.kv_channels % 8 == 0, "model.kv_channels",
              f"must be a multiple of 8 (3D RoPE uses kv_channels/8 bands per axis), got {self.kv_channels}")
        check(self.num_attention_heads * self.kv_channels % 8 == 0, "model.num_attention_heads",
              "heads*kv_channels must be a multiple of 8 (MAGI-1 linear_proj layout)")
        check_choice(self.attention_backend, "model.attention_backend", ATTENTION_BACKENDS)
        check_choice(self.layer_spec, "model.layer_spec", LAYER_SPECS)
        check_choice(self.params_dtype, "model.params_dtype", ("float32", "bfloat16"))
        if self.half_channel_vae:
            check(self.in_channels % 2 == 0 and self.out_channels % 2 == 0, "model.half_channel_vae",
                  "needs even in_channels and out_channels")
        check(self.x_rescale_factor > 0, "model.x_rescale_factor", f"must be > 0, got {self.x_rescale_factor}")

    # derived sizes
    @property
    def cond_dim(self) -> int:
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def xattn_dim(self) -> int:
        return int(self.hidden_size * self.xattn_cond_hidden_ratio)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_dim(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the model consumes (before half_channel_vae duplication)."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        return (latent_h // self.patch_size) * (latent_w // self.patch_size)


# Released sizes (magi1-reference.md). tiny/debug run on a laptop CPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(),
    "debug": dict(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                  kv_channels=32, caption_channels=128, caption_max_length=32),
    "4.5B": dict(num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24, num_query_groups=8,
                 kv_channels=128, gated_linear_unit=False, in_channels=16, out_channels=16, half_channel_vae=False,
                 x_rescale_factor=1.0, caption_channels=4096, caption_max_length=800, params_dtype="bfloat16"),
    "24B": dict(num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48, num_query_groups=8,
                kv_channels=128, gated_linear_unit=True, in_channels=32, out_channels=32, half_channel_vae=True,
                x_rescale_factor=0.1, caption_channels=4096, caption_max_length=800, params_dtype="bfloat16"),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    check_choice(name, "model.preset", tuple(PRESETS))
    known = {f.name for f in fields(ModelConfig)}
    for k in overrides:
        if k not in known:
            raise ConfigError(f"model.{k}: unknown key; accepted keys are {', '.join(sorted(known))}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def with_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
    return replace(cfg, **overrides)
