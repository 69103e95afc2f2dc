"""Layout-independent training checkpoints (torch.distributed.checkpoint) and MAGI-1 export from any layout.

`sharded_state(model, optimizer)` returns {"model": {name: DTensor}, "optim": {name: {key: DTensor}}} whose
DTensors are *views of the live tensors*, described as shards of one canonical global tensor per
parameter. DCP saves the shards each rank holds; loading into another tp/cp/pp/dp layout reads into the new
layout's views (in place), so the model and optimizer are restored directly.

Canonical global shapes (so that every rank's piece is one box whatever the layout):
  k, v        [G, hd, D]        kv_xattn [G, 2hd, X]      (KV heads whole; FSDP shards dim 1 of these)
  fc1 SwiGLU  [2, F, D]         (gate | up)               linear_proj [D, 2, Q]  (self | cross)
  others      as in the model (tp=1)
Mesh per pipeline stage: (tpa, tpb, dpcp) with tp rank = tpa*tpb_size + tpb; tpb > 1 only when tp exceeds
the KV heads (tpb ranks share a KV head)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from magi_train.staging import StagedDirectory

from magi_train.parallel.data_parallel import fsdp_shard_dim
from magi_train.parallel.parallelize import ParallelPlan, plan_of
from magi_train.parallel.state_dict_adapter import gather_tp_tensor, param_role


def _canonical(name: str, cfg, full_shape: tuple[int, ...]):
    """(canonical global shape, TP shard dim in it or None, the canonical dim FSDP's dim 0/1 maps to)."""
    role = param_role(name)
    hd, g = cfg.kv_channels, cfg.num_query_groups
    if role in ("k", "v"):
        return (g, hd, full_shape[1]), 0, {0: 0, 1: 2}
    if role == "kv_xattn":
        return (g, 2 * hd, full_shape[1]), 0, {0: 0, 1: 2}
    if role == "fc1" and cfg.gated_linear_unit:
        return (2, cfg.ffn_hidden_size, full_shape[1]), 1, {0: 0, 1: 2}
    if role == "proj":
        return (full_shape[0], 2, cfg.q_dim), 2, {0: 0, 1: 1}
    if role in ("q", "qx", "fc1"):
        return tuple(full_shape), 0, {0: 0, 1: 1}
    if role == "fc2":
        return tuple(full_shape), 1, {0: 0, 1: 1}
    return tuple(full_shape), None, {0: 0, 1: 1}


def _stage_mesh(plan: ParallelPlan):
    """DeviceMesh (tpa, tpb, dpcp) of this rank's pipeline stage (metadata only: no process groups)."""
    if getattr(plan, "_ckpt_mesh", None) is not None:
        return plan._ckpt_mesh
    from torch.distributed.device_mesh import DeviceMesh

    env, cfg = plan.env, plan.model_cfg
    rep = max(1, env.tp // cfg.num_query_groups)
    me = (env.pp_rank, env.tp_rank, env.dp_cp_rank, env.rank)
    table = [None] * env.world_size
    if env.distributed:
        dist.all_gather_object(table, me)
    else:
        table = [me]
    dpcp = env.dp * env.cp
    grid = torch.empty((env.tp // rep, rep, dpcp), dtype=torch.int64)
    for pp_rank, tp_rank, dpcp_rank, rank in table:
        if pp_rank == env.pp_rank:
            grid[tp_rank // rep, tp_rank % rep, dpcp_rank] = rank
    names = ("tpa", "tpb", "dpcp")
    try:
        mesh = DeviceMesh(env.device.type, grid, mesh_dim_names=names, _init_backend=False, _rank=env.rank)
    except TypeError:  # older torch: no _rank (the mesh finds this rank itself)
        mesh = DeviceMesh(env.device.type, grid, mesh_dim_names=names, _init_backend=False)
    plan._ckpt_mesh = mesh
    return mesh


def _local_of(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t._local_tensor, True
    return t, False


def global_view(plan: ParallelPlan, name: str, tensor: torch.Tensor):
    """A DTensor viewing `tensor` (a parameter of `name`, or anything laid out like it: optimizer moments,
    EMA weights) as its shard of the canonical global tensor. Shares storage with `tensor`."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    env, cfg = plan.env, plan.model_cfg
    local, fsdp = _local_of(tensor.detach())
    full = _full_shape(plan, name, tensor)
    cshape, tp_dim, fsdp_map = _canonical(name, cfg, full)
    rep = max(1, env.tp // cfg.num_query_groups)
    # the local piece in canonical coordinates: split the dimension the canonical view splits
    role = param_role(name)
    if role in ("k", "v"):
        view = local.unflatten(0, (-1, cfg.kv_channels))
    elif role == "kv_xattn":
        view = local.unflatten(0, (-1, 2 * cfg.kv_channels))
    elif role == "fc1" and cfg.gated_linear_unit:
        view = local.unflatten(0, (2, -1))
    elif role == "proj":
        view = local.unflatten(1, (2, -1))
    else:
        view = local
    if not env.distributed:
        return view
    if tp_dim is None or env.tp == 1:
        tp_place = [Replicate(), Replicate()]
    elif param_role(name) in ("k", "v", "kv_xattn") and rep > 1:
        tp_place = [Shard(0), Replicate()]
    else:
        tp_place = [Shard(tp_dim), Shard(tp_dim)]
    if fsdp:
        dim = fsdp_shard_dim(name, cfg) if local.dim() > 1 else 0
        dp_place = Shard(fsdp_map[dim])
    else:
        dp_place = Replicate()
    stride = torch.empty(cshape, device="meta").stride()
    return DTensor.from_local(view, _stage_mesh(plan), [*tp_place, dp_place], run_check=False, shape=torch.Size(cshape),
                              stride=stride)


def _full_shape(plan: ParallelPlan, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
    from magi_train.parallel.state_dict_adapter import full_shape

    # an FSDP DTensor's shape is its TP-local shape; so is a plain tensor's
    return full_shape(name, tensor.shape, plan.model_cfg, plan.env.tp)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (one zero-gradient step at lr 0) so a checkpoint can be
    loaded into it; parameters and their gradients are left as they were."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    saved_grad = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if not torch.is_tensor(g["lr"]) else torch.zeros_like(g["lr"])
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, saved_lr):
        g["lr"] = lr
    for p, grad in zip(params, saved_grad):
        p.grad = grad


def optimizer_views(plan: ParallelPlan, named_parameters, optimizer: torch.optim.Optimizer) -> dict:
    """{name: {key: tensor}} of the optimizer's per-parameter state, loadable in place: moments laid out like
    the parameter become global views, step counters stay themselves. named_parameters: (name, parameter), each
    name once (pipeline-shared copies beyond the first are left out); parameters without state are left out."""
    out = {}
    for name, p in named_parameters:
        state = optimizer.state.get(p)
        if state:
            out[name] = {k: global_view(plan, name, v) if v.shape == p.shape else v
                         for k, v in state.items() if torch.is_tensor(v)}
    return out


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """DCP-ready, layout-independent state of the model (and optimizer) of any layout; in-place loadable."""
    plan = plan_of(model)
    out = {"model": {n: global_view(plan, n, p) for n, p in plan.named_parameters()}}
    if optimizer is not None:
        out["optim"] = optimizer_views(plan, plan.named_parameters(), optimizer)
    return out


@torch.no_grad()
def after_load(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, ema=None) -> None:
    """Copy what was loaded into the first copy of each pipeline-shared parameter into the others; DeepSpeed:
    set its ZeRO partitions (and the EMA's) from what was loaded."""
    plan = plan_of(model)
    if plan.engine is not None:
        from magi_train.parallel.deepspeed_state import write_back

        write_back(plan, optimizer, ema)
        return
    copies = plan.shared_copies()
    for name, ps in copies.items():
        for p in ps[1:]:
            _local_of(p)[0].copy_(_local_of(ps[0])[0])
            if optimizer is not None and ps[0] in optimizer.state:
                for k, v in optimizer.state[ps[0]].items():
                    dst = optimizer.state.get(p, {}).get(k)
                    if torch.is_tensor(v) and torch.is_tensor(dst):
                        _local_of(dst)[0].copy_(_local_of(v)[0])


def save(model: nn.Module, path: str | os.PathLike, optimizer=None) -> None:
    """Plain DCP save of sharded_state (the training loop's CheckpointManager adds atomic renames)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path), no_dist=not plan_of(model).env.distributed)


def load(model: nn.Module, path: str | os.PathLike, optimizer=None) -> None:
    """Fill model (and optimizer) of any layout in place from a checkpoint saved under any layout."""
    import torch.distributed.checkpoint as dcp

    if optimizer is not None:
        init_optimizer_state(optimizer)
    dcp.load(sharded_state(model, optimizer), checkpoint_id=str(path), no_dist=not plan_of(model).env.distributed)
    after_load(model, optimizer)


# ----------------------------------------------------------------------------- MAGI-1 export
@torch.no_grad()
def export_magi(model: nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write MAGI-1 safetensors (one shard per pipeline stage + index) from any layout; returns the directory
    on global rank 0. Each stage gathers its tensors over TP and FSDP; one rank per stage writes them.
    tensors: {name: tensor laid out like that parameter} written instead of the parameter (EMA weights)."""
    from safetensors.torch import save_file

    from magi_train.checkpoint.magi_format import to_magi_layout

    plan = plan_of(model)
    env = plan.env
    staged = StagedDirectory(out_dir)
    tmp = staged.path
    if env.rank == 0:
        staged.create()
    if env.distributed:
        dist.barrier()
    state = {}
    shared_written_by_first = env.pp_rank == 0
    for name, p in plan.named_parameters():
        t = gather_tp_tensor(name, (tensors or {}).get(name, p), plan.model_cfg, env.tp_group)
        if name.startswith(("t_embedder.", "y_embedder.", "rope.")) and not shared_written_by_first:
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.cpu().contiguous()
    writer = env.tp_rank == 0 and env.dp_cp_rank == 0
    # one stage: a single model.safetensors; pipeline stages: one shard each, with the release's index file
    fname = "model.safetensors" if env.pp == 1 else f"model-{env.pp_rank + 1:05d}-of-{env.pp:05d}.safetensors"
    if writer:
        save_file(to_magi_layout(state), str(tmp / fname), metadata={"format": "pt"})
        (tmp / f"{fname}.keys.json").write_text(json.dumps(sorted(state)))
    if env.distributed:
        dist.barrier()
    if env.rank != 0:
        return None
    if env.pp == 1:
        (tmp / f"{fname}.keys.json").unlink()
        return staged.commit()
    weight_map, total = {}, 0
    for keys_file in sorted(tmp.glob("*.keys.json")):
        shard = keys_file.name[: -len(".keys.json")]
        for k in json.loads(keys_file.read_text()):
            weight_map[k] = shard
        keys_file.unlink()
        total += (tmp / shard).stat().st_size
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return staged.commit()
