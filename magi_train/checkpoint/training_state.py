"""Layout-independent training checkpoints: what a tp/cp/pp/dp run saves, loadable by any layout and by one
process.

Every parameter, AdamW moment and EMA weight is saved as this rank's shard of one canonical global tensor
(magi_train.checkpoint.sharded.global_view), so DCP reads it back into any other layout in place. Beside
them, as in the one-process format (checkpoint.py): the scheduler, the trainer's counters (with
`format` = FORMAT, which tells the formats apart), each rank's RNG states (`rank_XXXXX`, restored when the
world size is the same) and each data-parallel rank's data position (`data_XXXXX`, restored when the number
of data-parallel ranks is the same: the ranks of one model replica share it).

A one-process run keeps saving whole tensors in its own format; it loads this one through a view of its model
as the canonical tensors (`one_process_plan`). A parallel run resumes a one-process checkpoint by reading its
whole tensors one parameter at a time on every rank and keeping its own piece (`load_one_process_checkpoint`)."""
from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint import FileSystemReader

from magi_train.config import ModelConfig
from magi_train.config.parallel_config import ParallelConfig

FORMAT = "layout_independent"


def data_key(dp_rank: int) -> str:
    return f"data_{dp_rank:05d}"


def saved_keys(path: str | os.PathLike) -> set[str]:
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def has_entry(keys: set[str], key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in keys)


def is_layout_independent(keys: set[str]) -> bool:
    return "trainer.format" in keys


def one_process_plan(model_cfg: ModelConfig, device: torch.device):
    """A ParallelPlan describing one process (no groups): global_view then returns the canonical views of the
    model's own tensors."""
    from magi_train.parallel import ParallelPlan
    from magi_train.parallel.env import ParallelEnv

    env = ParallelEnv(pcfg=ParallelConfig(dp=1), device=device)
    return ParallelPlan(env=env, model_cfg=model_cfg, shells=[], stage_ids=[0], num_stages=1, sharding=None,
                        grad_sync=None)


def tensor_state(plan, named_parameters, optimizer: torch.optim.Optimizer | None, ema=None) -> dict:
    """{"model": {name: view}, "optimizer": {name: {exp_avg: view, ...}}, "ema": {...}}: canonical views of the
    live tensors, so a DCP load fills the model, the optimizer and the EMA in place. named_parameters: (MAGI-1
    name, parameter), each name once; the optimizer's other parameters (pipeline-shared copies) are left out."""
    from magi_train.checkpoint.sharded import global_view, optimizer_views

    if getattr(plan, "engine", None) is not None:   # DeepSpeed ZeRO: converted from its partitions
        from magi_train.parallel.deepspeed_state import tensor_state as deepspeed_tensor_state

        return deepspeed_tensor_state(plan, optimizer, ema)
    named = list(named_parameters)
    out = {"model": {n: global_view(plan, n, p) for n, p in named}}
    if optimizer is not None:
        out["optimizer"] = optimizer_views(plan, named, optimizer)
    if ema is not None:
        out["ema"] = {"updates": ema.updates, "shadow": {n: global_view(plan, n, t) for n, t in ema.shadow.items()}}
    return out


def restore_lr(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """The learning rate of each group from the (loaded) scheduler: this format keeps no param_groups."""
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _place(full: torch.Tensor, view: torch.Tensor) -> None:
    """Copy this rank's piece of `full` (a whole tensor, any shape with view's number of elements) into view."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    full = full.reshape(view.shape)
    if isinstance(view, DTensor):
        shape, offset = compute_local_shape_and_global_offset(view.shape, view.device_mesh, view.placements)
        view._local_tensor.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
    else:
        view.copy_(full)


def load_one_process_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Fill a layout-independent `state` (tensor_state's views of this rank's tensors, plus the scheduler,
    trainer and data entries) from a checkpoint in the one-process format (whole tensors). Every rank reads
    the whole tensors of one parameter at a time (weights, AdamW moments, EMA) and keeps its piece."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    from .manager import pack_rank_state, rank_key, unpack_rank_state

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    planner = lambda: DefaultLoadPlanner(allow_partial_load=True)   # noqa: E731

    small = {"scheduler": state["scheduler"], "trainer": {"step": 0, "world_size": 0}, rank_key(0): b""}
    if "ema" in state:
        small["ema"] = {"updates": 0}
    dcp.load(small, checkpoint_id=str(path), planner=planner(), no_dist=True)
    state["scheduler"] = small["scheduler"]
    state["trainer"] = {"step": small["trainer"]["step"], "world_size": small["trainer"]["world_size"], "dp_size": 1,
                        "format": "one_process"}
    if data_key(0) in state:
        state[data_key(0)] = pack_rank_state({"data": unpack_rank_state(small[rank_key(0)])["data"]})
    if "ema" in state:
        state["ema"]["updates"] = small["ema"]["updates"]

    for name, view in state["model"].items():
        targets = {f"model.{name}": view}
        for k, v in state.get("optimizer", {}).get(name, {}).items():
            if torch.is_tensor(v):
                targets[f"optimizer.state.{name}.{k}"] = v
        if "ema" in state and name in state["ema"]["shadow"]:
            targets[f"ema.shadow.{name}"] = state["ema"]["shadow"][name]
        missing = [k for k in targets if k not in meta]
        if missing:
            raise ValueError(f"resume: {path} holds no {missing[0]} (a checkpoint of another model?)")
        whole = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in targets}
        dcp.load(whole, checkpoint_id=str(path), planner=planner(), no_dist=True)
        for k, view in targets.items():
            _place(whole[k], view)


__all__ = ["FORMAT", "data_key", "saved_keys", "has_entry", "is_layout_independent", "one_process_plan",
           "tensor_state", "load_one_process_checkpoint", "restore_lr"]
