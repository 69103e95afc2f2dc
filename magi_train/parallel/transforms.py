"""What the training path applies to each model shell inside parallelize, after the layout is cut and before
FSDP/DDP shards it, in this fixed order: freezing -> activation checkpointing -> compile -> model converters (fp8).

Inference passes none of them. Each concern lives in one module: freezing by name pattern (training/freeze.py
decides the names), recompute (recompute.py), compile (per block), fp8 conversion (precision/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .recompute import apply_activation_checkpointing, transformer_layers


@dataclass(frozen=True)
class ModelTransforms:
    trainable: Callable[[str], bool] | None = None   # MAGI-1 parameter name -> trained; None: every parameter
    activation_checkpointing: bool = False           # recompute each block in backward
    compile: bool = False                            # torch.compile each block


def apply_transforms(shell: nn.Module, t: ModelTransforms) -> None:
    for name, p in shell.named_parameters():
        p.requires_grad_(t.trainable is None or t.trainable(name))
    if t.activation_checkpointing:
        apply_activation_checkpointing(shell)
    if t.compile:
        for layer in transformer_layers(shell):
            layer.compile()


__all__ = ["ModelTransforms", "apply_transforms"]
