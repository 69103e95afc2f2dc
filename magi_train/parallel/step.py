"""forward_backward for any layout, with the signature of magi_train.training.step.forward_backward.

pp = 1: the microbatches run one after another (gradient sync only on the last one); pp > 1: the configured
torch.distributed.pipelining schedule. Then finalize_grads. Gradients are those of the mean loss over the
microbatches; the return value is that mean (the same on every rank of one model replica)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from magi_train.grad_accumulation import Microbatch, accumulate_gradients, autocast_context

from .parallelize import ParallelPlan, plan_of
from .pipeline import pack_target, split_model_kwargs


def _set_grad_sync(model: nn.Module, plan: ParallelPlan | None, enabled: bool):
    if plan is not None:
        for root in plan.fsdp_roots:
            root.set_requires_gradient_sync(enabled)
    if not enabled and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _pipelined(plan: ParallelPlan, microbatches, loss_fn, autocast_dtype):
    """One step of the configured schedule through pipelining's public `step`: the microbatches are stacked
    along the batch and split back by the schedule (equal batch sizes keep them exactly as prepared)."""
    env = plan.env
    n = len(microbatches)
    sizes = {kw["x"].shape[0] for kw, _, _ in microbatches}
    if len(sizes) != 1:
        raise ValueError(f"parallel.pp: pipeline microbatches need one batch size, got {sorted(sizes)}")
    scale = 1.0 / n
    runner = plan.runner
    weight_shape = microbatches[0][2].shape   # packed as [B, -1] with the target: restore its own shape
    runner.loss_fn = lambda out, target, weight: loss_fn(out.float(), target, weight.reshape(weight_shape)) * scale
    xs, kws = zip(*(split_model_kwargs(kw) for kw, _, _ in microbatches))
    sched = runner.schedule(xs[0], n, plan.sharding.shards)
    stacked = {k: torch.cat([kw[k] for kw in kws]) if torch.is_tensor(kws[0][k]) else kws[0][k] for k in kws[0]}
    target = torch.cat([pack_target(t, w) for _, t, w in microbatches])
    losses: list[torch.Tensor] = []
    with autocast_context(env.device, autocast_dtype, plan.forward_context):
        sched.step(torch.cat(xs), target=target, losses=losses, return_outputs=False, **stacked)
    last_owner = env.pp_ranks[(plan.num_stages - 1) % env.pp]
    total = torch.stack([x.detach().float() for x in losses]).sum() if losses else \
        torch.zeros((), device=env.device)
    total = total.to(env.device)
    dist.broadcast(total, src=last_owner, group=env.pp_group)
    return total


def forward_backward(model: nn.Module, microbatches: Sequence[Microbatch], loss_fn, *,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    if not microbatches:
        raise ValueError("forward_backward: needs at least one microbatch")
    plan = plan_of(model)
    if plan is not None and plan.engine is not None:   # dp_mode=deepspeed: the engine reduces and steps
        from .deepspeed_engine import forward_backward as deepspeed_forward_backward

        return deepspeed_forward_backward(plan.engine, microbatches, loss_fn, autocast_dtype, plan.forward_context)
    if plan is not None and plan.runner is not None:
        loss = _pipelined(plan, microbatches, loss_fn, autocast_dtype)
    else:
        loss = accumulate_gradients(model, microbatches, loss_fn, autocast_dtype,
                                    lambda last: _set_grad_sync(model, plan, last),
                                    forward_context=plan.forward_context if plan is not None else None)
    if plan is not None:
        plan.grad_sync.finalize()
    return loss


def finalize_grads(model: nn.Module) -> None:
    """The layout's extra gradient reductions (forward_backward calls it; call it after a custom backward)."""
    plan = plan_of(model)
    if plan is not None:
        plan.grad_sync.finalize()
