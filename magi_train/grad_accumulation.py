"""Gradient accumulation over one optimizer step's microbatches: the loop that one process and every parallel
layout without pipeline stages share, so that both compute the same mean loss and gradients.

microbatches: list of (model_kwargs, target, loss_weight) from diffusion.prepare_inputs;
loss_fn(v_pred, target, loss_weight) -> scalar. Gradients are accumulated into .grad as the mean over the
microbatches; the return value is that mean loss, detached."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

Microbatch = tuple[dict, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast_context(device: torch.device, dtype: torch.dtype | None,
                     forward_context: Callable[[], ContextManager] | None = None):
    """What a training forward runs under: bf16 autocast where asked (GPU; nothing on fp32 runs) and the
    layout's forward context (TE's fp8_autocast for train.fp8=te: ParallelPlan.forward_context)."""
    stack = contextlib.ExitStack()
    if dtype is not None and dtype != torch.float32:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if forward_context is not None:
        stack.enter_context(forward_context())
    return stack


def accumulate_gradients(model: nn.Module, microbatches: Sequence[Microbatch], loss_fn: LossFn,
                         autocast_dtype: torch.dtype | None,
                         sync_context: Callable[[bool], ContextManager], *,
                         forward_context: Callable[[], ContextManager] | None = None,
                         backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """sync_context(last) wraps each microbatch's forward and backward: data-parallel wrappers reduce
    gradients only when last is True. forward_context: see autocast_context. backward(scaled_loss): what runs
    the backward (default loss.backward(); DeepSpeed's engine.backward)."""
    if not microbatches:
        raise ValueError("forward_backward: needs at least one microbatch")
    device = microbatches[0][1].device
    total = torch.zeros((), device=device)
    scale = 1.0 / len(microbatches)
    for i, (kwargs, target, weight) in enumerate(microbatches):
        with sync_context(i == len(microbatches) - 1):
            with autocast_context(device, autocast_dtype, forward_context):
                v_pred = model(**kwargs)
            loss = loss_fn(v_pred.float(), target, weight)
            if backward is None:
                (loss * scale).backward()
            else:
                backward(loss * scale)
        total += loss.detach() * scale
    return total


__all__ = ["Microbatch", "LossFn", "autocast_context", "accumulate_gradients"]
