"""One optimizer step's forward and backward over its microbatches (gradient accumulation), single process.

A pipeline-parallel version (magi_train.parallel) offers the same signature, so the loop does not change:

    loss = forward_backward(model, microbatches, loss_fn, autocast_dtype=...)

microbatches: list of (model_kwargs, target, loss_weight) from diffusion.prepare_inputs;
loss_fn(v_pred, target, loss_weight) -> scalar. Gradients are accumulated into .grad as the mean over the
microbatches; the return value is that mean loss, detached."""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

Microbatch = tuple[dict, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (GPU); nothing on fp32 runs."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync_context(model: nn.Module, last: bool):
    # DDP: all-reduce gradients only on the last microbatch. FSDP2 modules are told the same through
    # set_requires_gradient_sync by the data-parallel wrapper; here nothing else needs it.
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, microbatches: Sequence[Microbatch], loss_fn: LossFn, *,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    if not microbatches:
        raise ValueError("forward_backward: needs at least one microbatch")
    device = microbatches[0][1].device
    total = torch.zeros((), device=device)
    scale = 1.0 / len(microbatches)
    for i, (kwargs, target, weight) in enumerate(microbatches):
        with _sync_context(model, last=i == len(microbatches) - 1):
            with autocast_context(device, autocast_dtype):
                v_pred = model(**kwargs)
            loss = loss_fn(v_pred.float(), target, weight)
            (loss * scale).backward()
        total += loss.detach() * scale
    return total


__all__ = ["forward_backward", "autocast_context", "Microbatch", "LossFn"]
