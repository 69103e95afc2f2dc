"""Transformer Engine layer spec: TE Linear layers (fp8-capable, optionally tensor parallel) for the blocks.

Written to TE's public API (transformer_engine.pytorch.Linear with parallel_mode / tp_group). TE is an optional
extra for GPU clusters (pip install 'magi[te]'); it is imported only when model.layer_spec='te' is chosen."""
from __future__ import annotations

from torch import nn


def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise RuntimeError("model.layer_spec='te' needs Transformer Engine (pip install 'magi[te]' on a CUDA machine); "
                           "accepted without it: 'local', 'megatron'") from e
    return te


class _TELinear(nn.Module):
    """TE's Linear returns a tensor already; this wrapper only fixes the constructor arguments per role."""

    def __init__(self, in_features: int, out_features: int, parallel_mode: str | None, tp_group, tp_size: int):
        super().__init__()
        te = _te()
        self.linear = te.Linear(in_features, out_features, bias=False, parallel_mode=parallel_mode,
                                tp_group=tp_group, tp_size=tp_size, params_dtype=None)

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, x):
        return self.linear(x)


class TESpec:
    """column/row linears from TE; fp8 is switched on around the forward with fp8_autocast (see fp8_context)."""

    def __init__(self, tp_group=None, tp_size: int = 1):
        _te()  # fail at build time, not mid-forward
        self.tp_group, self.tp_size = tp_group, tp_size

    def column(self, in_features: int, out_features: int, role: str) -> nn.Module:
        mode = "column" if self.tp_size > 1 else None
        return _TELinear(in_features, out_features, mode, self.tp_group, self.tp_size)

    def row(self, in_features: int, out_features: int, role: str) -> nn.Module:
        mode = "row" if self.tp_size > 1 else None
        return _TELinear(in_features, out_features, mode, self.tp_group, self.tp_size)

    def local_heads(self, heads: int, role: str) -> int:
        return max(1, heads // self.tp_size)
