"""Input embedders of the MAGI-1 DiT: timestep and caption (all run in fp32)."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
    """Sinusoidal features of t (t in [0,1] is multiplied by 1000), order [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs * scale
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Text tokens -> cross-attention inputs; a learned flag row (-2 kept, -1 dropped) -> adaLN condition.

    null_caption_embedding doubles as the 'empty prompt' the model sees when a caption is dropped (CFG)."""

    def __init__(self, caption_channels: int, xattn_dim: int, cond_dim: int, max_length: int):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(nn.Linear(caption_channels, xattn_dim), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(caption_channels, cond_dim))
        self.null_caption_embedding = nn.Parameter(torch.randn(max_length, caption_channels) * 0.02)

    def adaln(self, dropped: torch.Tensor) -> torch.Tensor:
        """dropped [B] bool -> [B, cond_dim]."""
        rows = torch.where(dropped[:, None], self.null_caption_embedding[-1][None], self.null_caption_embedding[-2][None])
        return self.y_proj_adaln(rows)

    def xattn(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj_xattn(caption)
