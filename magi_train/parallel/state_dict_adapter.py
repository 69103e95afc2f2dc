"""Full (tp=1) parameters <-> one TP rank's shard, by parameter name (names equal MAGI-1's).

A sharded parameter is described by a `TPLayout`: the dimension it is split on and, for rank r, the indices
of the full tensor along that dimension the rank holds (not always one contiguous range: SwiGLU fc1 holds a
slice of the gate half and the same slice of the up half; linear_proj holds its self-attention and its
cross-attention heads). Every other parameter is replicated on every TP rank. Used to load one set of
weights into any layout, to gather the full model for MAGI-1 export, and by tests to compare gradients."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from magi_train.config import ModelConfig

_ROLE = re.compile(r"videodit_blocks\.layers\.\d+\.(self_attention\.linear_qkv\.(q|qx|k|v)"
                   r"|self_attention\.linear_kv_xattn|self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)"
                   r"\.weight$")


def param_role(name: str) -> str | None:
    """q | qx | k | v | kv_xattn | proj | fc1 | fc2 for TP-sharded parameters, None for replicated ones."""
    m = _ROLE.search(name)
    if not m:
        return None
    if m.group(2):
        return m.group(2)
    return {"self_attention.linear_kv_xattn": "kv_xattn", "self_attention.linear_proj": "proj",
            "mlp.linear_fc1": "fc1", "mlp.linear_fc2": "fc2"}[m.group(1)]


@dataclass(frozen=True)
class TPLayout:
    dim: int
    index: tuple[int, ...]     # indices of the full tensor along dim held by this rank, in local order
    replicas: int = 1          # > 1: the same slice lives on this many TP ranks (KV heads beyond the KV-head count)


def _span(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def tp_layout(name: str, cfg: ModelConfig, tp: int, rank: int) -> TPLayout | None:
    role = param_role(name)
    if role is None or tp == 1:
        return None
    hd, g = cfg.kv_channels, cfg.num_query_groups
    if role in ("q", "qx"):
        n = cfg.q_dim // tp
        return TPLayout(0, tuple(_span(rank * n, n)))
    if role in ("k", "v", "kv_xattn"):
        width = hd * (2 if role == "kv_xattn" else 1)   # kv_xattn: per KV head [k(hd), v(hd)]
        if tp <= g:
            n = g // tp * width
            return TPLayout(0, tuple(_span(rank * n, n)))
        rep = tp // g
        return TPLayout(0, tuple(_span(rank // rep * width, width)), replicas=rep)
    if role == "fc1":
        f = cfg.ffn_hidden_size
        n = f // tp
        if cfg.gated_linear_unit:
            return TPLayout(0, tuple(_span(rank * n, n) + _span(f + rank * n, n)))
        return TPLayout(0, tuple(_span(rank * n, n)))
    if role == "fc2":
        n = cfg.ffn_hidden_size // tp
        return TPLayout(1, tuple(_span(rank * n, n)))
    if role == "proj":
        q = cfg.q_dim
        n = q // tp
        return TPLayout(1, tuple(_span(rank * n, n) + _span(q + rank * n, n)))
    raise AssertionError(role)


def shard_tensor(name: str, full: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    lay = tp_layout(name, cfg, tp, rank)
    if lay is None:
        return full
    return full.index_select(lay.dim, torch.tensor(lay.index, device=full.device)).contiguous()


def shard_state_dict(full: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor], names, cfg: ModelConfig,
                     tp: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's tensors for `names` (the keys its model holds) from the full tp=1 weights.

    full: a mapping, or a function name -> tensor (so a large checkpoint is read one tensor at a time)."""
    get = full.__getitem__ if isinstance(full, Mapping) else full
    return {n: shard_tensor(n, get(n), cfg, tp, rank) for n in names}


def full_shape(name: str, local_shape, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    lay = tp_layout(name, cfg, tp, 0)
    if lay is None:
        return tuple(local_shape)
    shape = list(local_shape)
    role = param_role(name)
    if role in ("k", "v", "kv_xattn"):
        shape[0] = cfg.kv_dim * (2 if role == "kv_xattn" else 1)
    else:
        shape[lay.dim] = shape[lay.dim] * tp
    return tuple(shape)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The whole TP-local tensor of a parameter (gathers an FSDP-sharded DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.device.type == "cpu" and t.device_mesh.device_type == "cuda":
        t = t.to("cuda")   # FSDP CPU offload: gather on the GPU
    return t.full_tensor()


def gather_tp_tensor(name: str, local: torch.Tensor, cfg: ModelConfig, tp_group) -> torch.Tensor:
    """Collective over the TP group: the full tensor from every rank's shard (every rank gets it)."""
    local = _local(local).detach()
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    if tp > 1 and local.device.type == "cpu" and dist.get_backend(tp_group) == "nccl":
        local = local.cuda()
    if tp == 1 or param_role(name) is None:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=tp_group)
    out = local.new_empty(full_shape(name, local.shape, cfg, tp))
    for r, part in enumerate(parts):
        lay = tp_layout(name, cfg, tp, r)
        out.index_copy_(lay.dim, torch.tensor(lay.index, device=out.device), part)
    return out


def gather_tp_state(local: Mapping[str, torch.Tensor], cfg: ModelConfig, tp_group) -> dict[str, torch.Tensor]:
    return {n: gather_tp_tensor(n, t, cfg, tp_group) for n, t in local.items()}
