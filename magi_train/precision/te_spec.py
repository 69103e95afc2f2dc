"""Transformer Engine layer spec: TE Linear layers (fp8-capable, optionally tensor parallel) for the blocks.

Written to TE's public API (transformer_engine.pytorch.Linear with parallel_mode / tp_group). TE is an optional
extra for GPU clusters (pip install 'magi[te]'); it is imported only when model.layer_spec='te' is chosen."""
from __future__ import annotations

import functools

import torch
from torch import nn


def _te():
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise RuntimeError("model.layer_spec='te' (which train.fp8='te' selects) needs Transformer Engine (pip install "
                           "'magi[te]' on a CUDA machine); without it use model.layer_spec 'auto', 'local' or "
                           "'megatron' and train.fp8 'none' or 'torchao'") from e
    return te


@functools.lru_cache(maxsize=1)
def _te_linear_class(te):
    """te.Linear under MAGI-1's names: `weight` (no wrapper level) and no `_extra_state` entry (TE's fp8 scaling
    metadata: delayed-scaling amax histories restart on resume), so checkpoints, init and export go by name."""

    class MagiTELinear(te.Linear):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

    return MagiTELinear


def _te_linear(in_features: int, out_features: int, parallel_mode: str | None, tp_group, tp_size: int) -> nn.Module:
    te = _te()
    device = torch.get_default_device()   # meta inside build_dit(device="meta"); parallelize materialises it
    return _te_linear_class(te)(in_features, out_features, bias=False, parallel_mode=parallel_mode,
                                tp_group=tp_group, tp_size=tp_size, params_dtype=torch.get_default_dtype(),
                                device=device)


def is_te_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "MagiTELinear"


class TESpec:
    """column/row linears from TE; fp8 is switched on around the forward with fp8_autocast (train.fp8=te,
    precision/fp8_training.forward_context)."""

    def __init__(self, tp_group=None, tp_size: int = 1):
        _te()  # fail at build time, not mid-forward
        self.tp_group, self.tp_size = tp_group, tp_size

    def column(self, in_features: int, out_features: int, role: str) -> nn.Module:
        mode = "column" if self.tp_size > 1 else None
        return _te_linear(in_features, out_features, mode, self.tp_group, self.tp_size)

    def row(self, in_features: int, out_features: int, role: str) -> nn.Module:
        mode = "row" if self.tp_size > 1 else None
        return _te_linear(in_features, out_features, mode, self.tp_group, self.tp_size)

    def local_heads(self, heads: int, role: str) -> int:
        return max(1, heads // self.tp_size)
