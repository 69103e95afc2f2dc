"""Activation checkpointing (recompute in backward), applied from outside the model, per transformer block.

The composable kind (hooks on the module) keeps parameter names MAGI-1's, so gradient bookkeeping, checkpoints
and export go by name whatever the layout. The one place the training path applies recompute."""
from __future__ import annotations

from torch import nn


def transformer_layers(shell: nn.Module) -> list[nn.Module]:
    """The blocks this shell holds (a pipeline stage's shell has placeholders for the others)."""
    from magi_train.model.block import TransformerLayer

    return [m for m in shell.videodit_blocks.layers if isinstance(m, TransformerLayer)]


def apply_activation_checkpointing(shell: nn.Module) -> None:
    from torch.distributed._composable import checkpoint

    for layer in transformer_layers(shell):
        checkpoint(layer)


__all__ = ["apply_activation_checkpointing", "transformer_layers"]
