"""Differentiable collectives along the sequence (dim 0) and head dimensions; device-agnostic (gloo and NCCL).

Each pairs a forward collective with the backward that keeps gradients exact:
  split_seq          slice of a replicated tensor      | all-gather of the slices' grads
  gather_seq         all-gather, consumer replicated    | own slice of the (identical) grad
  all_gather_seq     all-gather, consumer per rank      | reduce-scatter (sum) of the grads
  copy_to_group      identity, consumer per rank        | all-reduce (sum) of the grads
  seq_to_heads / heads_to_seq   Ulysses all-to-all (sequence <-> heads), each the other's backward"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather0(x: torch.Tensor, group) -> torch.Tensor:
    p = _size(group)
    out = torch.empty((p * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter0(x: torch.Tensor, group) -> torch.Tensor:
    p = _size(group)
    out = torch.empty((x.shape[0] // p, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _slice0(x: torch.Tensor, group) -> torch.Tensor:
    n = x.shape[0] // _size(group)
    r = _rank(group)
    return x[r * n:(r + 1) * n]


class _SplitSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice0(x, group).contiguous()

    @staticmethod
    def backward(ctx, g):
        return _all_gather0(g, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _slice0(g, ctx.group).contiguous(), None


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter0(g, ctx.group), None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # empty_like would keep a permuted layout
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, head_dim: int) -> torch.Tensor:
    # [S/P, ..., H, ...] -> [S, ..., H/P, ...]
    p = _size(group)
    h = x.shape[head_dim]
    x = x.unflatten(head_dim, (p, h // p)).movedim(head_dim, 0)   # [P, S/P, ..., H/P, ...]
    x = _a2a(x, group)                                             # x[j] = rank j's sequence shard, my heads
    return x.flatten(0, 1)


def _heads_to_seq(x: torch.Tensor, group, head_dim: int) -> torch.Tensor:
    # [S, ..., H/P, ...] -> [S/P, ..., H, ...]
    p = _size(group)
    x = x.unflatten(0, (p, x.shape[0] // p))                       # [P, S/P, ..., H/P, ...]
    x = _a2a(x, group)                                             # x[j] = my sequence shard, rank j's heads
    return x.movedim(0, head_dim).flatten(head_dim, head_dim + 1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, head_dim):
        ctx.group, ctx.head_dim = group, head_dim
        return _seq_to_heads(x, group, head_dim)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.head_dim), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, head_dim):
        ctx.group, ctx.head_dim = group, head_dim
        return _heads_to_seq(x, group, head_dim)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.head_dim), None, None


def split_seq(x, group):
    return x if _size(group) == 1 else _SplitSeq.apply(x, group)


def gather_seq(x, group):
    return x if _size(group) == 1 else _GatherSeq.apply(x, group)


def all_gather_seq(x, group):
    return x if _size(group) == 1 else _AllGatherSeq.apply(x, group)


def copy_to_group(x, group):
    if _size(group) == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _CopyToGroup.apply(x, group)


def seq_to_heads(x, group, head_dim: int):
    return x if _size(group) == 1 else _SeqToHeads.apply(x, group, head_dim)


def heads_to_seq(x, group, head_dim: int):
    return x if _size(group) == 1 else _HeadsToSeq.apply(x, group, head_dim)
