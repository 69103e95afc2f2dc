"""Context parallelism: the token sequence is sharded over the CP group; attention runs Ulysses-style.

Between layers every CP rank holds an equal, contiguous slice of the (T H W) token sequence (padded to a
multiple of cp; with whole chunks per rank whenever cp divides the chunk count). Around attention an
all-to-all trades the slice of all heads for the whole sequence of heads/cp, so the chunk-causal mask is
applied to the full sequence and every rank does the same attention work whatever the mask's shape. When cp
exceeds the KV heads a rank holds (8 in MAGI-1), K/V are all-gathered over the sequence instead and each rank
picks the KV heads its query heads use.

With Megatron sequence parallelism (tp > 1) each CP slice is further split over the TP group on the residual
stream; the column/row linears gather and reduce-scatter it, attention sees the CP slice."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from magi_train.model.block import AttentionCore, BlockContext

from .comm import _size, all_gather_seq, copy_to_group, gather_seq, heads_to_seq, seq_to_heads, split_seq


def _pad0(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])


class SequenceSharding:
    """Set as model.context_parallel: shard(h, ctx) after the embedding, gather(h) before the final layer."""

    def __init__(self, cp_group=None, tp_group=None, sequence_parallel: bool = False):
        self.cp_group = cp_group
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and _size(tp_group) > 1
        self.cp = _size(cp_group)
        self.tp = _size(tp_group)
        self._seq_len: int | None = None

    @property
    def shards(self) -> int:
        return self.cp * (self.tp if self.sequence_parallel else 1)

    def _split(self, x: torch.Tensor, residual: bool) -> torch.Tensor:
        x = split_seq(_pad0(x, self.shards), self.cp_group)
        if residual and self.sequence_parallel:
            x = split_seq(x, self.tp_group)
        return x

    def shard_context(self, ctx: BlockContext) -> BlockContext:
        """The per-rank view of the layers' context. Tensors used only by this rank's tokens or heads get an
        all-reduce on their gradient, so the embedders that made them see the whole sequence's gradient."""
        seq_group = [self.cp_group] + ([self.tp_group] if self.sequence_parallel else [])
        cond = ctx.cond
        for g in seq_group:
            cond = copy_to_group(cond, g)
        # RoPE is applied to this rank's heads only: rope.bands is summed over TP in finalize_grads
        cos, sin = self._split(ctx.rope_cos, residual=False), self._split(ctx.rope_sin, residual=False)
        token_chunk = self._split(ctx.token_chunk, residual=True)
        return dataclasses.replace(ctx, cond=cond, rope_cos=cos, rope_sin=sin, token_chunk=token_chunk,
                                   caption=copy_to_group(ctx.caption, self.cp_group))

    def shard(self, h: torch.Tensor, ctx: BlockContext):
        self._seq_len = h.shape[0]
        return self._split(h, residual=True), self.shard_context(ctx)

    def gather(self, h: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        if self.sequence_parallel:
            h = gather_seq(h, self.tp_group)
        h = gather_seq(h, self.cp_group)
        n = seq_len if seq_len is not None else self._seq_len
        return h[:n] if n is not None else h


def _kv_head_index(q_heads: int, kv_heads: int, cp: int, cp_rank: int) -> list[int]:
    """KV heads used by this rank's query heads after the all-to-all (one entry per KV head the core sees)."""
    rep = q_heads // kv_heads
    per_rank = q_heads // cp
    idx = [(cp_rank * per_rank + j) // rep for j in range(per_rank)]
    unique = sorted(set(idx))
    if per_rank % len(unique) == 0 and idx == [u for u in unique for _ in range(per_rank // len(unique))]:
        return unique  # aligned with GQA groups: the core's repeat_interleave expands them
    return idx         # query heads straddle groups unevenly: one KV head per query head


class UlyssesAttention(nn.Module):
    """Replaces a layer's self_attention.core: all-to-all in, the unchanged core on the whole sequence, back out."""

    def __init__(self, core: AttentionCore, cp_group, q_heads: int, kv_heads: int):
        super().__init__()
        self.core = core
        self.cp_group = cp_group
        self.cp = _size(cp_group)
        self.q_heads, self.kv_heads = q_heads, kv_heads
        if q_heads % self.cp:
            raise ValueError(f"parallel.cp: must divide the attention heads per TP rank ({q_heads}), got {self.cp}")
        self.kv_all_to_all = kv_heads % self.cp == 0
        import torch.distributed as dist

        rank = dist.get_rank(cp_group) if cp_group is not None else 0
        self.kv_index = None if self.kv_all_to_all else _kv_head_index(q_heads, kv_heads, self.cp, rank)

    def forward(self, layer: int, q, k, v, qx, kx, vx, ctx: BlockContext):
        S = ctx.layout.q_len
        g = self.cp_group
        qq = seq_to_heads(torch.stack([q, qx], dim=2), g, head_dim=3)[:S]          # [S, B, 2, H/cp, D]
        q, qx = qq[:, :, 0], qq[:, :, 1]
        if self.kv_all_to_all:
            kv = seq_to_heads(torch.stack([k, v], dim=2), g, head_dim=3)[:S]
            k, v = kv[:, :, 0], kv[:, :, 1]
            h = self.kv_heads // self.cp
            r = self._rank()
            kx, vx = kx[..., r * h:(r + 1) * h, :], vx[..., r * h:(r + 1) * h, :]
        else:
            kv = all_gather_seq(torch.stack([k, v], dim=2), g)[:S]
            idx = torch.tensor(self.kv_index, device=k.device)
            k, v = kv[:, :, 0].index_select(2, idx), kv[:, :, 1].index_select(2, idx)
            kx, vx = kx.index_select(-2, idx), vx.index_select(-2, idx)
        ac = self.core(layer, q, k, v, qx, kx, vx, ctx)                               # [S, B, 2, H/cp, D]
        pad = (-S) % self.cp
        if pad:
            ac = F.pad(ac, (0, 0) * (ac.dim() - 1) + (0, pad))
        return heads_to_seq(ac, g, head_dim=3)                                        # [S/cp, B, 2, H, D]

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.cp_group) if self.cp_group is not None else 0


def apply_context_parallel(model, cp_group, tp_group=None, sequence_parallel: bool = False) -> SequenceSharding:
    """Install the sharding hook and the Ulysses cores into a MagiDiT (or a pipeline stage shell of one)."""
    sharding = SequenceSharding(cp_group, tp_group, sequence_parallel)
    if sharding.shards == 1:
        return sharding
    model.context_parallel = sharding
    if _size(cp_group) > 1:
        for layer in model.videodit_blocks.layers:
            attn = getattr(layer, "self_attention", None)
            if attn is None:
                continue  # a layer held by another pipeline stage
            attn.core = UlyssesAttention(attn.core, cp_group, attn.heads, attn.kv_heads)
    return sharding
