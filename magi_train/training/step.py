"""One optimizer step's forward and backward over its microbatches (gradient accumulation), single process.

A pipeline-parallel version (magi_train.parallel) offers the same signature, so the loop does not change:

    loss = forward_backward(model, microbatches, loss_fn, autocast_dtype=...)

microbatches: list of (model_kwargs, target, loss_weight) from diffusion.prepare_inputs;
loss_fn(v_pred, target, loss_weight) -> scalar. Gradients are accumulated into .grad as the mean over the
microbatches; the return value is that mean loss, detached."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from magi_train.grad_accumulation import LossFn, Microbatch, accumulate_gradients, autocast_context


def _sync_context(model: nn.Module, last: bool):
    # DDP: all-reduce gradients only on the last microbatch. FSDP2 modules are told the same through
    # set_requires_gradient_sync by the data-parallel wrapper; here nothing else needs it.
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, microbatches: Sequence[Microbatch], loss_fn: LossFn, *,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    return accumulate_gradients(model, microbatches, loss_fn, autocast_dtype, lambda last: _sync_context(model, last))


__all__ = ["forward_backward", "autocast_context", "Microbatch", "LossFn"]
