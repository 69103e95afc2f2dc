"""The MAGI-1 video VAE: a ViT encoder/decoder over (4, 8, 8) patches with a diagonal Gaussian latent.

Structure, parameter names and config fields follow the public release (its ViTVAE, "ddconfig" in config.json,
weights in diffusion_pytorch_model.safetensors), so the released directory loads strictly. Written here from
that description: patch Conv3d -> [cls] + tokens + learned position table (trilinearly resized when the token
grid differs from the training grid) -> pre-norm blocks -> LayerNorm -> Linear to 2*z (mean, logvar). The
decoder mirrors it and unpatchifies into `embed_dim / (pt*ph*pw)` channels before a 3x3x3 Conv3d to RGB.
With ln_in_attn each head's q, k and v are standardised ((x - mean) / (std + 1e-5), no affine) and the
block's first LayerNorm is absent.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from magi_train.staging import staged_directory
from .vae_base import TilingOptions, VideoVAE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_FILE_BIN = "diffusion_pytorch_model.bin"
RELEASE_CLASS_NAME = "ViTVAE"
MAGI_SCALE_FACTOR = 0.18215
# ddconfig keys of the release that change nothing at inference (dropout rates, an unused qk scale).
_INERT_KEYS = ("qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate")


@dataclass
class MagiVAEArch:
    """The release's ddconfig. Defaults describe the released MAGI-1 VAE (1024-wide, 24 blocks, 16 heads,
    z=16, patches 4x8x8, trained on 16x256x256 clips); config.json in the weights directory overrides them."""
    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = True
    conv_last_layer: bool = True
    use_rope: bool = False
    use_final_proj: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"vae ddconfig.depth: must be an integer >= 0, got {self.depth!r}")
        for name in ("video_size", "video_length", "patch_size", "patch_length", "z_chans", "embed_dim",
                     "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"vae ddconfig.{name}: must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vae ddconfig.num_heads: must divide embed_dim={self.embed_dim}, got {self.num_heads}")
        if self.use_rope:
            raise ValueError("vae ddconfig.use_rope: only false is supported (the released VAE does not use it)")
        if not self.conv_last_layer:
            raise ValueError("vae ddconfig.conv_last_layer: the decoder needs true (as in the release)")
        if not self.double_z:
            raise ValueError("vae ddconfig.double_z: only true is supported (the latent is a mean/logvar pair)")
        if not self.use_final_proj and self.embed_dim % (self.patch_size ** 2 * self.patch_length):
            raise ValueError(f"vae ddconfig.embed_dim: must be a multiple of patch_size^2*patch_length="
                             f"{self.patch_size ** 2 * self.patch_length}, got {self.embed_dim}")

    @classmethod
    def from_ddconfig(cls, ddconfig: dict) -> "MagiVAEArch":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(ddconfig) - known - set(_INERT_KEYS))
        if unknown:
            raise ValueError(f"vae ddconfig: unknown keys {unknown}; accepted: {sorted(known)}")
        return cls(**{k: v for k, v in ddconfig.items() if k in known})

    @property
    def token_grid(self) -> tuple[int, int, int]:
        return (self.video_length // self.patch_length, self.video_size // self.patch_size,
                self.video_size // self.patch_size)


class HeadStandardize(nn.Module):
    """Per-head standardisation without affine parameters; the release adds eps to the std, not the variance."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / (std + self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, standardize_heads: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qkv_norm = HeadStandardize() if standardize_heads else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv_norm(self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, arch: MagiVAEArch):
        super().__init__()
        dim = arch.embed_dim
        # With ln_in_attn the release has no first LayerNorm (its weights hold no norm1 entries).
        self.norm1 = nn.Identity() if arch.ln_in_attn else nn.LayerNorm(dim)
        self.attn = Attention(dim, arch.num_heads, arch.qkv_bias, arch.ln_in_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * arch.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, arch: MagiVAEArch):
        super().__init__()
        kernel = (arch.patch_length, arch.patch_size, arch.patch_size)
        self.proj = nn.Conv3d(arch.in_chans, arch.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _TokenTransformer(nn.Module):
    """What encoder and decoder share: cls token, position table (resized to the token grid), blocks, norm."""

    def __init__(self, arch: MagiVAEArch):
        super().__init__()
        self.grid = arch.token_grid
        self.num_cls = 1 if arch.with_cls_token else 0
        dim = arch.embed_dim
        if self.num_cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2] + self.num_cls, dim))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(dim)

    def init_weights(self) -> None:
        """Random initialisation as the release's training did (truncated normal 0.02, zero biases)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.num_cls:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.grid):
            return self.pos_embed
        table = self.pos_embed[:, self.num_cls:].reshape(1, *self.grid, -1).permute(0, 4, 1, 2, 3)
        table = F.interpolate(table.float(), size=tuple(grid), mode="trilinear", align_corners=False)
        table = table.to(self.pos_embed.dtype).permute(0, 2, 3, 4, 1).reshape(1, -1, self.pos_embed.shape[-1])
        return torch.cat([self.pos_embed[:, : self.num_cls], table], dim=1)

    def run(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        if self.num_cls:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = tokens + self.positions(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class MagiEncoder(_TokenTransformer):
    def __init__(self, arch: MagiVAEArch):
        super().__init__(arch)
        self.patch_embed = PatchEmbed(arch)
        self.last_layer = nn.Linear(arch.embed_dim, 2 * arch.z_chans)
        self.norm_code = arch.norm_code
        self.init_weights()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)
        b, _, t, h, w = x.shape
        x = self.last_layer(self.run(x.flatten(2).transpose(1, 2), (t, h, w)))[:, self.num_cls:]
        x = x.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)
        if self.norm_code:
            x = (x.float() / torch.linalg.vector_norm(x.float(), dim=1, keepdim=True)).to(x.dtype)
        return x


class MagiDecoder(_TokenTransformer):
    def __init__(self, arch: MagiVAEArch):
        super().__init__(arch)
        dim = arch.embed_dim
        self.patch = (arch.patch_length, arch.patch_size, arch.patch_size)
        patch_volume = self.patch[0] * self.patch[1] * self.patch[2]
        self.proj_in = nn.Linear(arch.z_chans, dim)
        if arch.use_final_proj:
            self.unpatch_channels = 4
            self.final_proj = nn.Linear(dim, self.unpatch_channels * patch_volume)
            self.final_norm = nn.LayerNorm(self.unpatch_channels * patch_volume)
        else:
            self.unpatch_channels = dim // patch_volume
        self.last_layer = nn.Conv3d(self.unpatch_channels, 3, kernel_size=3, stride=1, padding=1)
        self.init_weights()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        x = self.run(self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, -1, c)), (t, h, w))[:, self.num_cls:]
        if hasattr(self, "final_proj"):
            x = self.final_norm(self.final_proj(x))
        pt, ph, pw = self.patch
        x = x.reshape(b, t, h, w, pt, ph, pw, self.unpatch_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.unpatch_channels, t * pt, h * ph, w * pw)
        return self.last_layer(x)


class MagiVAE(VideoVAE):
    decode_halo = (1, 1, 1)  # the decoder's last layer is a 3x3x3 conv; the encoder's patches do not overlap
    def __init__(self, arch: MagiVAEArch, scale_factor: float = MAGI_SCALE_FACTOR,
                 tiling: TilingOptions | None = None):
        super().__init__(scale_factor, tiling)
        self.arch = arch
        self.encoder = MagiEncoder(arch)
        self.decoder = MagiDecoder(arch)
        self.latent_channels = arch.z_chans
        self.spatial_factor = arch.patch_size
        self.temporal_factor = arch.patch_length

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent)


# --- the release's directory layout -------------------------------------------------------------------------

def read_magi_config(directory: str) -> MagiVAEArch:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"VAE directory not found: {directory} (vae.path / vae_pretrained)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE config not found: {path}")
    with open(path) as f:
        config = json.load(f)
    if config.get("_class_name") != RELEASE_CLASS_NAME:
        raise ValueError(f"{path}: _class_name is {config.get('_class_name')!r}, expected {RELEASE_CLASS_NAME!r}")
    if config.get("model_type", "vit") != "vit":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not supported (only 'vit')")
    if "ddconfig" not in config:
        raise ValueError(f"{path}: no 'ddconfig' entry")
    return MagiVAEArch.from_ddconfig(config["ddconfig"])


def read_magi_weights(directory: str) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file
        return load_file(safetensors_path)
    bin_path = os.path.join(directory, WEIGHTS_FILE_BIN)
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"VAE weights not found: {safetensors_path}")


def load_state_dict_strictly(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict) with assign (the model may sit on the meta device) and a one-line error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(expected[k].shape)} in the model)")
        raise ValueError(f"weights in {source} do not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)


def load_magi_vae(directory: str, scale_factor: float = MAGI_SCALE_FACTOR, tiling: TilingOptions | None = None,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MagiVAE:
    arch = read_magi_config(directory)
    state = read_magi_weights(directory)
    with torch.device("meta"):  # no random init of a 600M-parameter model only to overwrite it
        model = MagiVAE(arch, scale_factor, tiling)
    load_state_dict_strictly(model, state, directory)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_magi_vae(model: MagiVAE, directory: str) -> None:
    """Write the release's layout (config.json with ddconfig + diffusion_pytorch_model.safetensors), atomically."""
    from safetensors.torch import save_file

    with staged_directory(directory) as staging:
        config = {"_class_name": RELEASE_CLASS_NAME, "model_type": "vit", "ddconfig": asdict(model.arch)}
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(staging, WEIGHTS_FILE))
