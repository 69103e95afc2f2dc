"""fp8 training paths, applied from outside the model.

  te       Transformer Engine: build with model.layer_spec='te', then run forward under fp8_autocast(...).
  torchao  torchao.float8: swap the blocks' nn.Linear for Float8Linear (dynamic tensorwise scaling);
           PyTorch-native, installable anywhere, needs a GPU with fp8 GEMMs (Hopper/Ada) to run.
"""
from __future__ import annotations

import contextlib

from torch import nn

FP8_MODES = ("none", "te", "torchao")


def _block_linear_filter(module: nn.Module, fqn: str) -> bool:
    # fp8 GEMMs want both dims multiples of 16; embedders and the final linear stay high precision (MAGI-1's fp32 islands)
    if not isinstance(module, nn.Linear) or not fqn.startswith("videodit_blocks.layers."):
        return False
    if "ada_modulate_layer" in fqn:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_torchao_float8(model: nn.Module) -> int:
    """Convert block linears to torchao Float8Linear in place; returns how many were converted."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("train.fp8='torchao' needs torchao (pip install 'magi[fp8]'); accepted values are "
                           f"{', '.join(FP8_MODES)}") from e
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=_block_linear_filter)
    after = sum(type(m) is nn.Linear for m in model.modules())
    return before - after


def fp8_autocast(mode: str):
    """Context for the forward pass: TE's fp8_autocast with delayed scaling for 'te', nothing otherwise."""
    if mode not in FP8_MODES:
        raise ValueError(f"train.fp8: got {mode!r}, accepted values are {', '.join(FP8_MODES)}")
    if mode != "te":
        return contextlib.nullcontext()
    from .te_spec import _te

    te = _te()
    from transformer_engine.common.recipe import DelayedScaling, Format

    return te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16,
                                                                   amax_compute_algo="max"))
