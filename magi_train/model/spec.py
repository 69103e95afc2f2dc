"""Layer spec: which Linear classes the blocks use. Parallelism and precision enter the model only here.

Megatron's habit: a block asks the spec for its linears by role, so one block definition serves a single
process (local), Megatron tensor parallel (megatron) and Transformer Engine fp8 (te)."""
from __future__ import annotations

from typing import Protocol

from torch import nn


class LayerSpec(Protocol):
    tp_size: int

    def column(self, in_features: int, out_features: int, role: str) -> nn.Module:
        """Output features split over TP ranks; returns a module mapping [..., in] -> [..., out/tp]."""

    def row(self, in_features: int, out_features: int, role: str) -> nn.Module:
        """Input features split over TP ranks, output all-reduced: [..., in/tp] -> [..., out]."""

    def local_heads(self, heads: int, role: str) -> int:
        """Heads of this role held by one TP rank."""


class LocalSpec:
    """One process, plain torch.nn.Linear (no bias anywhere in MAGI-1's block linears)."""

    tp_size = 1

    def column(self, in_features: int, out_features: int, role: str) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def row(self, in_features: int, out_features: int, role: str) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def local_heads(self, heads: int, role: str) -> int:
        return heads
