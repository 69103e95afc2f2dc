"""The full (tp=1, one process) view of a parallel model: parameters or gradients under MAGI-1 names.

Collective over the whole world. Meant for export and for tests on small models: every rank of a pipeline
stage gathers its stage, then the stages are exchanged as CPU tensors."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .parallelize import plan_of
from .state_dict_adapter import gather_tp_tensor


@torch.no_grad()
def stage_full_state(model: nn.Module, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This pipeline stage's tensors, gathered over TP and data parallel (FSDP), on every rank of the stage."""
    plan = plan_of(model)
    out = {}
    for name, p in plan.named_parameters():
        t = p.grad if grads else p
        if t is None:
            t = torch.zeros_like(p)
        out[name] = gather_tp_tensor(name, t, plan.model_cfg, plan.env.tp_group).cpu()
    return out


@torch.no_grad()
def full_state(model: nn.Module, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of the model on every rank (CPU)."""
    plan = plan_of(model)
    state = stage_full_state(model, grads=grads)
    if plan.env.pp > 1:
        parts = [None] * plan.env.pp
        dist.all_gather_object(parts, state, group=plan.env.pp_group)
        state = {}
        for part in parts:
            for k, v in part.items():
                state.setdefault(k, v)
    return state
