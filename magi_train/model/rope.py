"""MAGI-1's learnable 3D rotary embedding (t, h, w), NeoX-style halves on the first 3/4 of each head."""
from __future__ import annotations

import math

import torch
from torch import nn


class LearnableRope3D(nn.Module):
    """kv_channels/8 learnable bands per axis; 3 axes -> 3*bands angles -> rotates 6*bands of kv_channels dims."""

    def __init__(self, head_dim: int, reference_tokens: int = 16, temperature: float = 10000.0):
        super().__init__()
        self.num_bands = head_dim // 8
        self.reference_tokens = reference_tokens
        exponent = torch.arange(self.num_bands, dtype=torch.float32) / self.num_bands
        self.bands = nn.Parameter(1.0 / temperature**exponent)

    @property
    def rotary_dim(self) -> int:
        return 6 * self.num_bands

    def positions(self, t0: int, frames: int, h: int, w: int, device) -> torch.Tensor:
        """[frames*h*w, 3] positions: absolute latent frame index; spatial centred and rescaled to the reference grid."""
        scale = math.sqrt(h * w / float(self.reference_tokens**2))
        axes = [torch.arange(t0, t0 + frames, device=device, dtype=torch.float32)]
        for size in (h, w):
            p = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
            if size > 1:  # map the grid's extent onto the reference grid's (MAGI-1's resize rule)
                p = p / (size - 1) * (size / scale - 1)
            axes.append(p)
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return grid.reshape(-1, 3)

    def forward(self, t0: int, frames: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, 3*bands], tokens in (T H W) order; always fp32."""
        device = device if device is not None else self.bands.device
        pos = self.positions(t0, frames, h, w, device)
        angles = (pos[:, :, None] * self.bands.float()[None, None, :]).reshape(pos.shape[0], -1)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, heads, head_dim] (S matching cos rows); rotates the first 2*cos.shape[-1] dims as two halves."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    c, s = cos[:, None, :], sin[:, None, :]
    while c.dim() < x1.dim():
        c, s = c.unsqueeze(1), s.unsqueeze(1)  # broadcast over batch dims after S
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)
