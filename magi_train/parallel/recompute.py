"""Activation recompute (checkpointing) per transformer block, applied from outside the model; the one place the
training path applies it.

    none       every block keeps what autograd saves
    full       a block keeps only its inputs and runs its forward again in backward
    selective  a block keeps its inputs and the outputs of the attention kernels (self and cross attention; at
               long sequences they are about half the block's FLOPs); the linears, norms and MLP run again
every k-th block (recompute_every) is recomputed, the others keep everything.

It is torch.utils.checkpoint (non-reentrant; selective through its selective-checkpoint policy) set on the
block as TransformerLayer.recompute, so parameter names stay MAGI-1's and a compiled block (transforms.py)
traces the checkpoint into its graph: compile and recompute both take effect."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

# the attention kernels SDPA dispatches to (cuDNN, flash, memory-efficient, CPU flash); what selective keeps
_ATTENTION_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_flash_attention_forward", "_efficient_attention_forward")


@dataclass(frozen=True)
class RecomputePolicy:
    mode: str = "none"        # none | full | selective (train.recompute)
    every: int = 1            # recompute blocks 0, k, 2k, ... of each shell (train.recompute_every)

    def recomputed(self, index: int) -> bool:
        """Whether the index-th block a shell holds is recomputed."""
        return self.mode != "none" and index % self.every == 0


def attention_ops() -> frozenset:
    return frozenset(getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS
                     if hasattr(torch.ops.aten, name))


def _keep_attention(saved: frozenset, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts(saved: frozenset):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_keep_attention, saved))


def transformer_layers(shell: nn.Module) -> list[nn.Module]:
    """The blocks this shell holds (a pipeline stage's shell has placeholders for the others)."""
    from magi_train.model.block import TransformerLayer

    return [m for m in shell.videodit_blocks.layers if isinstance(m, TransformerLayer)]


def block_checkpoint(mode: str):
    """fn(compute, *args) running compute under torch.utils.checkpoint with the policy of `mode`. The block
    draws no random numbers, so the RNG state is not stashed for the recompute."""
    from torch.utils.checkpoint import checkpoint

    kwargs = dict(use_reentrant=False, preserve_rng_state=False)
    if mode == "selective":
        kwargs["context_fn"] = partial(_selective_contexts, attention_ops())
    elif mode != "full":
        raise ValueError(f"train.recompute: got {mode!r}, accepted values are 'none', 'full', 'selective'")
    return partial(checkpoint, **kwargs)


def apply_recompute(shell: nn.Module, policy: RecomputePolicy) -> int:
    """Set the recompute of the shell's blocks by the policy; returns how many blocks are recomputed."""
    if policy.mode == "none":
        return 0
    fn = block_checkpoint(policy.mode)
    n = 0
    for i, layer in enumerate(transformer_layers(shell)):
        if policy.recomputed(i):
            layer.recompute = fn
            n += 1
    return n


__all__ = ["RecomputePolicy", "apply_recompute", "block_checkpoint", "attention_ops", "transformer_layers"]
