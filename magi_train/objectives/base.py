"""The objective seam of the training path: what a step trains the model to do.

An objective is a pair (prepare inputs, loss), as the training loop and every layout's forward_backward use it:

    mb = objective.prepare(batch, generator, step)        # (model_kwargs, target, loss_weight): one microbatch
    loss = forward_backward(model, [mb, ...], objective.loss)
    per_chunk = objective.loss.pop()                      # detached per-chunk losses of the step, for t-bin logs

`loss(v_pred, target, loss_weight) -> scalar` is called once per microbatch (on the last pipeline stage with pp > 1)
and keeps each call's per-chunk losses. Frozen auxiliary models an objective needs (a teacher) are built by the
training runtime with the run's layout (`runtime.build_frozen`) and handed to the objective's constructor, so
they are sharded and placed like the trained model."""
from __future__ import annotations

from typing import Protocol

import torch

from magi_train.grad_accumulation import Microbatch


class ChunkLoss(Protocol):
    def __call__(self, v_pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor: ...

    def pop(self) -> list[torch.Tensor]: ...


class Objective(Protocol):
    name: str
    loss: ChunkLoss

    def prepare(self, batch: dict, generator: torch.Generator, step: int) -> Microbatch: ...


__all__ = ["Objective", "ChunkLoss"]
