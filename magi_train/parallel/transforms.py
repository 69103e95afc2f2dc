"""What the training path applies to each model shell inside parallelize, after the layout is cut and before
FSDP/DDP shards it, in this fixed order: freezing -> activation recompute -> compile -> model converters (fp8).

Inference passes none of them. Each concern lives in one module: freezing by name pattern (training/freeze.py
decides the names), recompute (recompute.py), compile (per block, here), fp8 (precision/fp8_training.py).
Compile is lazy (the first call traces the block), so a block compiled here is traced with its recompute and its
fp8 linears in place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from magi_train.precision.fp8_training import Fp8Settings, convert_to_fp8

from .recompute import RecomputePolicy, apply_recompute, transformer_layers


@dataclass(frozen=True)
class ModelTransforms:
    trainable: Callable[[str], bool] | None = None   # MAGI-1 parameter name -> trained; None: every parameter
    recompute: RecomputePolicy = field(default_factory=RecomputePolicy)   # activation recompute per block
    compile: bool = False                            # torch.compile each block (its recompute traced inside)
    fp8: Fp8Settings = field(default_factory=Fp8Settings)                 # fp8 GEMMs of the block linears


def compile_blocks(shell: nn.Module, backend="inductor") -> None:
    """torch.compile each block in place (parameter names unchanged). The blocks share one code object and
    differ only in their parameters, which dynamo takes as inputs: one graph serves every block."""
    for layer in transformer_layers(shell):
        layer.compile(backend=backend)


def apply_transforms(shell: nn.Module, t: ModelTransforms) -> None:
    for name, p in shell.named_parameters():
        p.requires_grad_(t.trainable is None or t.trainable(name))
    apply_recompute(shell, t.recompute)
    if t.compile:
        compile_blocks(shell)
    convert_to_fp8(shell, t.fp8)


__all__ = ["ModelTransforms", "apply_transforms", "compile_blocks"]
