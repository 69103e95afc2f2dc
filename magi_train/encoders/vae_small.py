"""SmallVAE: a compact convolutional video VAE the demo trains in minutes on a CPU.

Each frame is folded into its latent grid at once (pixel unshuffle by the spatial factor: an 8x8 block of RGB
becomes 192 channels) and all convolutions run at latent resolution, where wide convolutions keep a CPU busy far
better than thin ones at full resolution (measured: ~4x more frames per second than a stride-2 pyramid of the
same depth). The decoder mirrors it and unfolds with pixel shuffle. A temporal factor above 1 merges that many
frames with a strided Conv3d (split again by its transpose); an optional temporal conv mixes neighbouring
latent frames. Saved as config.json + model.safetensors by save_pretrained, loaded by
build_vae(VAEConfig(kind="small", path=dir)).

architecture="patch" is the same fold without any network: a latent cell is the RGB of its block less the data's
mean, projected onto the block's top latent_channels principal components (all 3 * factor^2 of them: nothing lost;
fewer: a linear code whose size the DiT's tokens can carry). vae_training measures mean and components from the
clips, so nothing is trained by gradients. At 32x32 px the quickstart's DiT learns objects far better on these
latents than on a conv VAE trained for the same time (docs/quickstart.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from magi_train.staging import staged_directory
from .vae_base import TilingOptions, VideoVAE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "magi-small-vae"
# Initial log-variance of the posterior: start nearly deterministic, so early training is not drowned in noise.
_INITIAL_LOGVAR = -6.0
ARCHITECTURES = ("conv", "patch")


@dataclass
class SmallVAEArch:
    latent_channels: int = 8
    spatial_factor: int = 4          # power of two
    temporal_factor: int = 1         # power of two
    base_channels: int = 64          # width of every conv
    blocks: int = 3                  # residual blocks in the encoder and in the decoder
    temporal_mixing: bool = False
    architecture: str = "conv"       # conv: learned encoder/decoder; patch: pixel unshuffle less an offset, no network

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"vae.architecture: got {self.architecture!r}, accepted values are "
                             f"{', '.join(ARCHITECTURES)}")
        for name in ("latent_channels", "spatial_factor", "temporal_factor", "base_channels", "blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vae.{name}: must be a positive integer, got {value!r}")
        for name in ("spatial_factor", "temporal_factor"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"vae.{name}: must be a power of two, got {value}")
        if self.architecture == "patch":
            folded = 3 * self.spatial_factor ** 2
            if self.latent_channels > folded:
                raise ValueError(f"vae.latent_channels: a patch VAE keeps at most the {folded} values of a "
                                 f"{self.spatial_factor}x{self.spatial_factor} RGB block, got {self.latent_channels}")
            if self.temporal_factor != 1 or self.temporal_mixing:
                raise ValueError("vae.temporal_factor: a patch VAE works frame by frame (temporal_factor 1, no "
                                 f"temporal_mixing), got {self.temporal_factor}, {self.temporal_mixing}")

    @property
    def reach(self) -> int:
        """Latent cells a 3x3 conv stack of one side sees on either side (its receptive-field radius)."""
        return 0 if self.architecture == "patch" else self.blocks * 2 + 2


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class TemporalMix(nn.Module):
    """Residual conv over 3 neighbouring latent frames (starts as the identity)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.silu(x))


def _frames(x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] -> [B*T, C, H, W]
    return x.transpose(1, 2).flatten(0, 1)


def _video(x: torch.Tensor, batch: int) -> torch.Tensor:  # [B*T, C, H, W] -> [B, C, T, H, W]
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class SmallEncoder(nn.Module):
    def __init__(self, arch: SmallVAEArch):
        super().__init__()
        width, sf, tf = arch.base_channels, arch.spatial_factor, arch.temporal_factor
        self.spatial_factor = sf
        self.conv_in = nn.Conv2d(3 * sf * sf, width, 3, padding=1)
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(arch.blocks)))
        self.time_merge = nn.Conv3d(width, width, (tf, 1, 1), stride=(tf, 1, 1)) if tf > 1 else None
        self.time_mix = TemporalMix(width) if arch.temporal_mixing else None
        self.conv_out = nn.Conv2d(width, 2 * arch.latent_channels, 3, padding=1)
        with torch.no_grad():
            self.conv_out.bias[arch.latent_channels:] = _INITIAL_LOGVAR

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        x = self.blocks(self.conv_in(F.pixel_unshuffle(_frames(video), self.spatial_factor)))
        x = _video(x, b)
        if self.time_merge is not None:
            x = self.time_merge(x)
        if self.time_mix is not None:
            x = self.time_mix(x)
        return _video(self.conv_out(F.silu(_frames(x))), b)


class SmallDecoder(nn.Module):
    def __init__(self, arch: SmallVAEArch):
        super().__init__()
        width, sf, tf = arch.base_channels, arch.spatial_factor, arch.temporal_factor
        self.spatial_factor = sf
        self.conv_in = nn.Conv2d(arch.latent_channels, width, 3, padding=1)
        self.time_mix = TemporalMix(width) if arch.temporal_mixing else None
        self.time_split = nn.ConvTranspose3d(width, width, (tf, 1, 1), stride=(tf, 1, 1)) if tf > 1 else None
        self.blocks = nn.Sequential(*(ResBlock(width) for _ in range(arch.blocks)))
        self.conv_out = nn.Conv2d(width, 3 * sf * sf, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        x = _video(self.conv_in(_frames(z)), b)
        if self.time_mix is not None:
            x = self.time_mix(x)
        if self.time_split is not None:
            x = self.time_split(x)
        x = self.conv_out(F.silu(self.blocks(_frames(x))))
        return _video(F.pixel_shuffle(x, self.spatial_factor), b)


class PatchCodec(nn.Module):
    """Encoder and decoder of architecture="patch": pixel (un)shuffle, less a per-channel offset, onto orthonormal
    components (rows of `basis`). Not trained by gradients: vae_training sets the offset to the data's mean and the
    basis to its principal components, so latents are centred and objects stand out."""

    def __init__(self, arch: SmallVAEArch):
        super().__init__()
        self.spatial_factor = arch.spatial_factor
        folded = 3 * arch.spatial_factor ** 2
        self.offset = nn.Parameter(torch.zeros(folded), requires_grad=False)
        self.basis = nn.Parameter(torch.eye(folded)[: arch.latent_channels].clone(), requires_grad=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(_frames(video), self.spatial_factor)
        x = x - self.offset.to(x.dtype)[None, :, None, None]
        return _video(torch.einsum("kc,nchw->nkhw", self.basis.to(x.dtype), x), video.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("kc,nkhw->nchw", self.basis.to(z.dtype), _frames(z))
        x = x + self.offset.to(z.dtype)[None, :, None, None]
        return _video(F.pixel_shuffle(x, self.spatial_factor), z.shape[0])


class SmallVAE(VideoVAE):
    def __init__(self, arch: SmallVAEArch, scale_factor: float = 1.0, tiling: TilingOptions | None = None):
        super().__init__(scale_factor, tiling)
        self.arch = arch
        if arch.architecture == "patch":
            self.codec = PatchCodec(arch)
        else:
            self.encoder = SmallEncoder(arch)
            self.decoder = SmallDecoder(arch)
        self.latent_channels = arch.latent_channels
        self.spatial_factor = arch.spatial_factor
        self.temporal_factor = arch.temporal_factor
        # tiles blend away the reach of the conv stacks (exact when overlaps exceed twice this)
        mix = 1 if arch.temporal_mixing else 0
        self.encode_halo = (mix, arch.reach, arch.reach)
        self.decode_halo = (mix * arch.temporal_factor, arch.reach * arch.spatial_factor,
                            arch.reach * arch.spatial_factor)

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.arch.architecture == "patch":  # exact: a posterior of (almost) zero variance
            mean = self.codec.encode(video)
            return mean, torch.full_like(mean, -30.0)
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latent) if self.arch.architecture == "patch" else self.decoder(latent)

    def save_pretrained(self, directory: str, extra: dict | None = None) -> None:
        """config.json (architecture, scale factor, optional training facts) + model.safetensors, atomically."""
        from safetensors.torch import save_file

        with staged_directory(directory) as staging:
            config = {"format": FORMAT, "arch": asdict(self.arch), "scale_factor": self.scale_factor,
                      **({"training": extra} if extra else {})}
            with open(os.path.join(staging, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=2)
            state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, os.path.join(staging, WEIGHTS_FILE))


def load_small_vae(directory: str, tiling: TilingOptions | None = None) -> SmallVAE:
    from safetensors.torch import load_file

    from .vae_magi import load_state_dict_strictly

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"VAE directory not found: {directory} (vae.path)")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"small VAE file not found: {path}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    model = SmallVAE(SmallVAEArch(**config["arch"]), config["scale_factor"], tiling)
    load_state_dict_strictly(model, load_file(weights_path), directory)
    return model.eval()
