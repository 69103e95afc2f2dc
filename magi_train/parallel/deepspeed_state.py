"""DeepSpeed's ZeRO state <-> the layout-independent checkpoint format, the EMA's tensors, the MAGI-1 export.

ZeRO keeps flat partitions (a contiguous range of each flattened parameter, or of a group of them) that are no
box of the canonical tensors the checkpoint format describes. On save, each parameter, Adam moment and EMA weight
is gathered whole (one tensor at a time, DeepSpeed's tensor-fragment API) and this rank keeps the FSDP2-shaped
piece of it (the same dim-0/dim-1 chunk FSDP2 would hold over dp x cp), wrapped as an FSDP-like DTensor: the
checkpoint is then exactly what an FSDP2 run of the same layout writes, and FSDP2, DDP, one process or another
DeepSpeed stage resume it. On load the same pieces are filled by DCP and written back (`write_back`: gathered
whole again, each rank's ZeRO partition set from it). A rank holds at most one whole tensor at a time beyond the
1/(dp x cp) pieces.

EMA: ZeRO-1/2 keep every weight whole on every rank, the EMA too (as under DDP). ZeRO-3 keeps each rank's
partition of each weight (`ema_targets`): the EMA runs on those, gathered whole for checkpoints and exports."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_deepspeed(plan) -> bool:
    return plan is not None and getattr(plan, "engine", None) is not None


def _zero3(plan) -> bool:
    return plan.zero_stage == 3


def _shape(p) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


@torch.no_grad()
def full_weight(plan, p) -> torch.Tensor:
    """The whole (TP-local) weight: DeepSpeed's fp32 master of a trained parameter, the module's copy of a frozen
    one (a collective over the dp x cp group under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if p.requires_grad:
        w = safe_get_full_fp32_param(p)
        if w is not None:
            return w.reshape(_shape(p)).to(plan.env.device)
    if _zero3(plan):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone().to(plan.env.device)
    return p.data.detach().clone()


# ZeRO-3 empties the AdamW's param_groups between its steps (it steps one flat sub-group at a time), so the
# AdamW's state is read by its keys, the flat partitions, not through param_groups
def _has_state(optimizer) -> bool:
    return any(bool(st) for st in optimizer.state.values())


def _step_tensor(optimizer) -> torch.Tensor | None:
    return next((st["step"] for st in optimizer.state.values() if st and "step" in st), None)


def init_optimizer_state(plan, optimizer) -> None:
    """Create the AdamW's state on DeepSpeed's flat partitions (one zero-gradient step at lr 0, as
    checkpoint.sharded.init_optimizer_state does for the other engines) so a checkpoint can be loaded into it."""
    from magi_train.checkpoint.sharded import init_optimizer_state as plain_init

    if not _zero3(plan):
        plain_init(optimizer)   # ZeRO-1/2: the param_groups hold the flat fp32 partitions
        return
    zero = plan.engine.optimizer
    flats = zero.fp32_partitioned_groups_flat
    if all(optimizer.state.get(f) for f in flats):
        return
    if getattr(zero, "swap_optimizer", False):
        from magi_train.config import ConfigError

        raise ConfigError("resume: parallel.deepspeed.offload_optimizer=nvme keeps the optimizer states on disk "
                          "before the first step; resume with offload_optimizer=cpu (the checkpoint is the same)")
    saved = [(g["params"], g["lr"]) for g in optimizer.param_groups]
    grads = [f.grad for f in flats]
    for g in optimizer.param_groups:
        g["params"], g["lr"] = [], 0.0
    for i, f in enumerate(flats):
        optimizer.param_groups[zero.sub_group_to_group_id[i]]["params"].append(f)
        f.grad = torch.zeros_like(f)
    optimizer.step()
    for g, (params, lr) in zip(optimizer.param_groups, saved):
        g["params"], g["lr"] = params, lr
    for f, grad in zip(flats, grads):
        f.grad = grad


# ----------------------------------------------------------------------------- FSDP2-shaped pieces
def _mesh(plan):
    if getattr(plan, "_ds_mesh", None) is None:
        from .data_parallel import _mesh as dp_cp_mesh

        plan._ds_mesh = dp_cp_mesh(plan.env)
    return plan._ds_mesh


def _dim(plan, name: str, t: torch.Tensor) -> int:
    from .data_parallel import fsdp_shard_dim

    return fsdp_shard_dim(name, plan.model_cfg) if t.dim() > 1 else 0


def piece(plan, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's FSDP2-shaped piece of a whole tensor, as FSDP2's DTensor over dp x cp (the tensor itself
    when dp x cp = 1)."""
    env = plan.env
    n = env.dp * env.cp
    if n == 1:
        return full
    from torch.distributed.tensor import DTensor, Shard

    dim = _dim(plan, name, full)
    chunks = torch.chunk(full, n, dim)
    r = env.dp_cp_rank
    if r < len(chunks):
        local = chunks[r].clone()
    else:
        local = full.narrow(dim, 0, 0).clone()
    return DTensor.from_local(local, _mesh(plan), [Shard(dim)], run_check=False, shape=full.shape,
                              stride=full.stride())


def whole(plan, name: str, t: torch.Tensor) -> torch.Tensor:
    """Inverse of `piece`: the whole tensor from every rank's piece (a collective over dp x cp)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    env = plan.env
    n = env.dp * env.cp
    local = t._local_tensor
    full_shape = t.shape
    dim = _dim(plan, name, local)
    size = -(-full_shape[dim] // n)
    padded = torch.zeros((*full_shape[:dim], size, *full_shape[dim + 1:]), dtype=local.dtype, device=env.device)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=env.dp_cp_group)
    return torch.cat(parts, dim).narrow(dim, 0, full_shape[dim])


# ----------------------------------------------------------------------------- ZeRO-3 EMA partitions
def ema_targets(plan):
    """(name, tensor) pairs the EMA follows: the whole weights (ZeRO-1/2), or each rank's ZeRO-3 partition (a
    flat view of the partition, updated in place by every step)."""
    if not _zero3(plan):
        return list(plan.named_parameters())
    out = []
    for name, p in plan.named_parameters():
        view = p.ds_tensor.detach()
        view.requires_grad_(p.requires_grad)
        out.append((name, view))
    return out


def _partition_whole(plan, p, partition: torch.Tensor) -> torch.Tensor:
    group = p.ds_process_group
    flat = partition.detach().reshape(-1).to(plan.env.device)
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat, group=group)
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def _my_partition(p, full: torch.Tensor) -> torch.Tensor:
    n = p.ds_tensor.numel()
    start = dist.get_rank(p.ds_process_group) * n
    flat = full.reshape(-1)
    out = torch.zeros(n, dtype=full.dtype, device=full.device)
    if start < flat.numel():
        seg = flat[start:start + n]
        out[: seg.numel()] = seg
    return out


def ema_whole(plan, name: str, p, shadow: torch.Tensor) -> torch.Tensor:
    return _partition_whole(plan, p, shadow) if _zero3(plan) else shadow


# ----------------------------------------------------------------------------- checkpoint state
def _link_moments(plan, optimizer) -> None:
    """ZeRO-1/2 link each parameter's piece of the Adam moments only after their own first step, and in 0.19
    for the first parameter group only: link every group to the optimizer's current state (which also covers
    state created by a load before any step)."""
    zero = plan.engine.optimizer
    if _zero3(plan) or not hasattr(zero, "single_partition_of_fp32_groups"):
        return
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        state = optimizer.state.get(flat)
        if not state:
            continue
        for p in zero.bit16_groups[i]:
            if getattr(p, "_hp_mapping", None) is not None:
                p._hp_mapping.set_optim_state_fragment(flat, state)


def tensor_state(plan, optimizer, ema) -> dict:
    """The layout-independent entries (model, optimizer, ema) of a DeepSpeed run: global views of FSDP2-shaped
    pieces gathered from ZeRO's partitions; kept on the plan for `write_back` after a load (dropped by the next
    write_back or optimizer step)."""
    from magi_train.checkpoint.sharded import global_view

    named = list(plan.named_parameters())
    pieces = {"model": {}, "optimizer": {}, "ema": {}}
    state = {"step": _step_tensor(optimizer) if optimizer is not None else None}
    with_moments = optimizer is not None and _has_state(optimizer)
    if with_moments:
        _link_moments(plan, optimizer)
    from deepspeed.utils import safe_get_full_optimizer_state

    for name, p in named:
        pieces["model"][name] = piece(plan, name, full_weight(plan, p))
        if with_moments and p.requires_grad:
            moments = {}
            for k in MOMENTS:
                m = safe_get_full_optimizer_state(p, k)
                moments[k] = piece(plan, name, m.reshape(_shape(p)).to(plan.env.device))
            pieces["optimizer"][name] = moments
    if ema is not None:
        params = dict(named)
        for name, shadow in ema.shadow.items():
            pieces["ema"][name] = piece(plan, name, ema_whole(plan, name, params[name], shadow))
    plan._ds_pieces = pieces
    out = {"model": {n: global_view(plan, n, t) for n, t in pieces["model"].items()}}
    if optimizer is not None:
        out["optimizer"] = {}
        for n, moments in pieces["optimizer"].items():
            entry = {k: global_view(plan, n, t) for k, t in moments.items()}
            entry["step"] = state["step"].detach().clone()
            out["optimizer"][n] = entry
        plan._ds_steps = out["optimizer"]
    if ema is not None:
        out["ema"] = {"updates": ema.updates,
                      "shadow": {n: global_view(plan, n, t) for n, t in pieces["ema"].items()}}
    return out


@torch.no_grad()
def write_back(plan, optimizer, ema) -> None:
    """After a load into tensor_state's pieces: set ZeRO's partitions (fp32 master, module copy, moments, step)
    and the EMA from them, one whole tensor at a time."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    pieces = plan._ds_pieces
    params = dict(plan.named_parameters())
    if optimizer is not None and _has_state(optimizer):
        _link_moments(plan, optimizer)
    for name, p in params.items():
        w = whole(plan, name, pieces["model"][name])
        if p.requires_grad:
            safe_set_full_fp32_param(p, w)
        if _zero3(plan):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(w.to(p.data.device))
        else:
            p.data.copy_(w.to(p.data.device))
        for k, t in pieces["optimizer"].get(name, {}).items():
            safe_set_full_optimizer_state(p, whole(plan, name, t), k)
    steps = getattr(plan, "_ds_steps", None) or {}
    if steps and optimizer is not None:
        step = next(iter(steps.values()))["step"]
        for st in optimizer.state.values():
            if st and torch.is_tensor(st.get("step")):
                st["step"].copy_(step)
    if ema is not None:
        for name, t in pieces["ema"].items():
            w = whole(plan, name, t)
            target = ema.shadow[name]
            target.copy_(_my_partition(params[name], w).to(target.device) if _zero3(plan) else w)
    plan._ds_pieces = plan._ds_steps = None


class ExportTensors(Mapping):
    """{name: whole (TP-local) tensor} for export_magi, gathered on demand one name at a time (a collective:
    every rank asks for the names in the same order, as export_magi does): the weights, or the EMA's."""

    def __init__(self, plan, ema=None):
        self.plan, self.ema = plan, ema
        self.params = dict(plan.named_parameters())

    def __getitem__(self, name):
        p = self.params[name]
        if self.ema is not None and name in self.ema.shadow:
            return ema_whole(self.plan, name, p, self.ema.shadow[name])
        return full_weight(self.plan, p)

    def __iter__(self):
        return iter(self.params)

    def __len__(self):
        return len(self.params)


__all__ = ["is_deepspeed", "init_optimizer_state", "full_weight", "piece", "whole", "ema_targets", "tensor_state", "write_back",
           "ExportTensors"]
