"""LayerNorm with zero-centred gamma (MAGI-1's apply_layernorm_1p): effective weight = stored weight + 1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm1p(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = True):
        super().__init__()
        self.eps, self.zero_centered = eps, zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered else self.weight
        return F.layer_norm(x, (x.shape[-1],), w.to(x.dtype), self.bias.to(x.dtype), self.eps)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return (cap * torch.tanh(x.float() / cap)).to(x.dtype)
