"""Activation recompute (checkpointing) per transformer block, applied from outside the model; the one place the
training path applies it.

    none       every block keeps what autograd saves
    full       a block keeps only its inputs and runs its forward again in backward
    selective  a block keeps its inputs, the outputs of the attention kernels (self and cross attention; at
               long sequences they are about half the block's FLOPs) and the outputs of the GEMMs of the linears
               named in train.recompute_keep (qkv, proj, fc1, fc2); norms, gating, RoPE, activations and the
               other linears run again
every k-th block (recompute_every) is recomputed, the others keep everything. Selective can keep more linears
(train.recompute_keep_extra) in the last train.recompute_extra_blocks blocks of each stage: a block's kept
outputs cost the same wherever it sits (all are held when backward starts), and the last block runs its
backward first, at the peak, so keeping more there also shrinks what its recompute holds again.

Keeping a linear's output saves its GEMM in the recompute (2 x in_features FLOPs a kept element) for one element
of memory; its input is recomputed from cheaper things (a norm of the block input, the kept attention outputs, or
an activation of fc1's output), so the four cost per byte kept: fc2 (in 12288 for 4.5B) > proj (6144) > qkv = fc1.

It is torch.utils.checkpoint (non-reentrant; selective through its selective-checkpoint policy) set on the
block as TransformerLayer.recompute, so parameter names stay MAGI-1's and a compiled block (transforms.py)
traces the checkpoint into its graph: compile and recompute both take effect."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from magi_train.config.train_config import DEFAULT_RECOMPUTE_KEEP

# the attention kernels SDPA dispatches to (cuDNN, flash, memory-efficient, CPU flash); what selective keeps
_ATTENTION_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_flash_attention_forward", "_efficient_attention_forward")


# train.recompute_keep names -> the block's linears (MAGI-1 names) whose GEMM output selective keeps
KEEP_LINEARS = {"qkv": ("self_attention.linear_qkv.q", "self_attention.linear_qkv.qx", "self_attention.linear_qkv.k",
                        "self_attention.linear_qkv.v"),
                "proj": ("self_attention.linear_proj",), "fc1": ("mlp.linear_fc1",), "fc2": ("mlp.linear_fc2",)}
# the GEMM ops a linear's forward reaches (plain, with bias, fp8), and where their [in, out] weight operand sits
_GEMM_WEIGHT_ARG = {"mm": 1, "addmm": 2, "_scaled_mm": 1}


@dataclass(frozen=True)
class RecomputePolicy:
    mode: str = "none"        # none | full | selective (train.recompute)
    every: int = 1            # recompute blocks 0, k, 2k, ... of each shell (train.recompute_every)
    keep: tuple = DEFAULT_RECOMPUTE_KEEP   # selective: linears whose GEMM output is kept (train.recompute_keep)
    extra: tuple = ()         # selective: linears also kept in the last extra_blocks blocks (recompute_keep_extra)
    extra_blocks: int = 0     # train.recompute_extra_blocks

    def __post_init__(self):
        for key, names in (("recompute_keep", self.keep), ("recompute_keep_extra", self.extra)):
            bad = [k for k in names if k not in KEEP_LINEARS]
            if bad:
                raise ValueError(f"train.{key}: got {bad[0]!r}, accepted names are {', '.join(KEEP_LINEARS)}")

    def recomputed(self, index: int) -> bool:
        """Whether the index-th block a shell holds is recomputed."""
        return self.mode != "none" and index % self.every == 0

    def kept(self, index: int, blocks: int) -> tuple:
        """The linears whose GEMM output selective keeps in the index-th of a shell's `blocks` blocks."""
        if index >= blocks - self.extra_blocks:
            return self.keep + tuple(k for k in self.extra if k not in self.keep)
        return self.keep


def attention_ops() -> frozenset:
    import magi_train.model.attention_fp8  # noqa: F401  registers model.attention_backend=cudnn_fp8's op

    return frozenset([getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS
                      if hasattr(torch.ops.aten, name)] + [torch.ops.magi.cudnn_fp8_attention.default])


def gemm_ops() -> dict:
    """aten GEMM overload -> index of its [in, out] weight operand."""
    return {getattr(torch.ops.aten, name).default: i for name, i in _GEMM_WEIGHT_ARG.items()
            if hasattr(torch.ops.aten, name)}


def kept_gemm_shapes(layer: nn.Module, keep) -> frozenset:
    """[in, out] shapes of the weight operands of the GEMMs whose outputs selective keeps: each named linear, and
    the q/qx/k/v projection also as the one GEMM block.fused_column_projection makes of it (recompute is set
    before fp8 conversion, which unfuses it). Matched by shape, so a shape another linear of the block also has
    is left out (recomputed); linears that reach no aten GEMM (Transformer Engine's) match nothing."""
    weights = {n: m.weight for n, m in layer.named_modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}
    kept = {n for name in keep for n in KEEP_LINEARS[name] if n in weights}
    shapes = {(weights[n].shape[1], weights[n].shape[0]) for n in kept}
    others = {(w.shape[1], w.shape[0]) for n, w in weights.items() if n not in kept}
    for name in keep:
        ws = [weights[n] for n in KEEP_LINEARS[name] if n in weights]
        if len(ws) > 1:
            shapes.add((ws[0].shape[1], sum(w.shape[0] for w in ws)))
    return frozenset(shapes - others)


def _selective_policy(saved: frozenset, gemms: dict, shapes: frozenset, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in saved or (op in gemms and tuple(args[gemms[op]].shape) in shapes):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts(saved: frozenset, gemms: dict, shapes: frozenset):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_selective_policy, saved, gemms, shapes))


def transformer_layers(shell: nn.Module) -> list[nn.Module]:
    """The blocks this shell holds (a pipeline stage's shell has placeholders for the others)."""
    from magi_train.model.block import TransformerLayer

    return [m for m in shell.videodit_blocks.layers if isinstance(m, TransformerLayer)]


def block_checkpoint(mode: str, kept_shapes: frozenset = frozenset()):
    """fn(compute, *args) running compute under torch.utils.checkpoint with the policy of `mode`; selective also
    keeps the outputs of GEMMs whose weight operand has one of kept_shapes ([in, out]). The block draws no random
    numbers, so the RNG state is not stashed for the recompute."""
    from torch.utils.checkpoint import checkpoint

    kwargs = dict(use_reentrant=False, preserve_rng_state=False)
    if mode == "selective":
        kwargs["context_fn"] = partial(_selective_contexts, attention_ops(), gemm_ops(), kept_shapes)
    elif mode != "full":
        raise ValueError(f"train.recompute: got {mode!r}, accepted values are 'none', 'full', 'selective'")
    return partial(checkpoint, **kwargs)


def apply_recompute(shell: nn.Module, policy: RecomputePolicy) -> int:
    """Set the recompute of the shell's blocks by the policy; returns how many blocks are recomputed."""
    if policy.mode == "none":
        return 0
    layers = transformer_layers(shell)
    if not layers:
        return 0
    # one function a kept set (the blocks have one shape), so a compiled block's graph serves all blocks of a set
    fns: dict[tuple, object] = {}
    n = 0
    for i, layer in enumerate(layers):
        if policy.recomputed(i):
            keep = policy.kept(i, len(layers)) if policy.mode == "selective" else ()
            if keep not in fns:
                shapes = kept_gemm_shapes(layers[0], keep) if policy.mode == "selective" else frozenset()
                fns[keep] = block_checkpoint(policy.mode, shapes)
            layer.recompute = fns[keep]
            n += 1
    return n


__all__ = ["RecomputePolicy", "KEEP_LINEARS", "apply_recompute", "block_checkpoint", "attention_ops", "gemm_ops",
           "kept_gemm_shapes", "transformer_layers"]
