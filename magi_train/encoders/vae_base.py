"""VideoVAE: the interface of every video VAE (scaling, temporal padding, tiling); subclasses give the networks.

Temporal mapping: a clip of T frames is padded to a multiple of the temporal factor by repeating its last frame
(MAGI-1 does exactly this for a single image: four copies), so latent_frames(T) = ceil(T / factor) and a latent
of t frames decodes to t * factor frames; decode(..., num_frames=T) trims back to the clip's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .tiling import tiled_apply


@dataclass
class TilingOptions:
    enabled: bool = True
    height: int = 256      # tile size in pixels / frames
    width: int = 256
    frames: int = 12
    spatial_overlap: float = 0.25
    temporal_overlap: float = 0.0


class VideoVAE(nn.Module):
    """encode(video [B, 3, T, H, W] in [-1, 1]) -> latent [B, C, t, h, w] (times scale_factor);
    decode(latent) -> video in [-1, 1]. Subclasses implement encode_moments (mean, logvar) and decode_raw."""

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    # How far (in output samples, per T/H/W) zero padding at a tile edge changes the output; tiles blend it away.
    encode_halo: tuple[int, int, int] = (0, 0, 0)
    decode_halo: tuple[int, int, int] = (0, 0, 0)

    def __init__(self, scale_factor: float, tiling: TilingOptions | None = None):
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.tiling = tiling or TilingOptions()

    # --- networks, supplied by subclasses; inputs are already padded to whole factors ---
    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- temporal mapping ---
    def latent_frames(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.temporal_factor)

    def video_frames(self, latent_frames: int) -> int:
        return latent_frames * self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, self.latent_frames(num_frames), height // self.spatial_factor,
                width // self.spatial_factor)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        h, w = video.shape[3:]
        if h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"video height and width must be multiples of {self.spatial_factor}, got {h}x{w}")
        pad = self.video_frames(self.latent_frames(video.shape[2])) - video.shape[2]
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        return video

    # --- public interface ---
    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Latent of the clip: the posterior mean (MAGI-1 encodes deterministically) or a sample of it."""
        video = self._check_video(video).to(self.device, self.param_dtype)

        def moments(tile: torch.Tensor) -> torch.Tensor:
            mean, logvar = self.encode_moments(tile)
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                mean = mean + torch.exp(0.5 * logvar) * noise
            return mean

        z = self._maybe_tiled(video, moments, encoding=True)
        return z.float() * self.scale_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        if latent.dim() != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be [B, {self.latent_channels}, t, h, w], got {tuple(latent.shape)}")
        z = (latent.float() / self.scale_factor).to(self.device, self.param_dtype)
        video = self._maybe_tiled(z, self.decode_raw, encoding=False).float().clamp(-1.0, 1.0)
        if num_frames is not None:
            if num_frames > video.shape[2]:
                raise ValueError(f"num_frames={num_frames} exceeds the {video.shape[2]} frames this latent decodes to")
            video = video[:, :, :num_frames]
        return video

    def _maybe_tiled(self, x: torch.Tensor, fn, encoding: bool) -> torch.Tensor:
        opt = self.tiling
        if not opt.enabled:
            return fn(x)
        tf, sf = self.temporal_factor, self.spatial_factor
        tile_px = (max(opt.frames // tf, 1) * tf, max(opt.height // sf, 1) * sf, max(opt.width // sf, 1) * sf)
        overlaps = (opt.temporal_overlap, opt.spatial_overlap, opt.spatial_overlap)
        if encoding:
            stride = [max(int(t * (1 - o)), 1) for t, o in zip(tile_px, overlaps)]
            return tiled_apply(x, fn, tile_px, stride, align=(tf, sf, sf), down=(tf, sf, sf),
                               margin=self.encode_halo)
        tile_lat = (tile_px[0] // tf, tile_px[1] // sf, tile_px[2] // sf)
        stride = [max(int(t * (1 - o)), 1) for t, o in zip(tile_lat, overlaps)]
        return tiled_apply(x, fn, tile_lat, stride, up=(tf, sf, sf), margin=self.decode_halo)

    def forward(self, video: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass, untiled and unscaled: (reconstruction, mean, logvar)."""
        video = self._check_video(video)
        mean, logvar = self.encode_moments(video)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.decode_raw(z), mean, logvar
