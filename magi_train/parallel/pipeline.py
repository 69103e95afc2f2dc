"""Pipeline parallelism: the DiT cut at block boundaries into stages run by torch.distributed.pipelining.

Each stage is a "shell" of the MagiDiT: the same module tree with the layers of other stages replaced by
empty placeholders (so parameter names stay MAGI-1's) and the embedding / final layer only where they run.
Every stage rebuilds the cheap per-forward context (timestep and caption embeddings, RoPE, chunk layout)
from the microbatch's inputs, which pipelining passes to every stage as keyword arguments; only the hidden
states travel between stages. The embedders therefore live on every stage and their gradients are summed
over the pipeline (finalize_grads)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config import ModelConfig
from magi_train.model.dit import MagiDiT

from .context_parallel import SequenceSharding

# parameters every pipeline stage holds a copy of (gradients summed over the pipeline group)
PIPELINE_SHARED_PREFIXES = ("t_embedder.", "y_embedder.", "rope.")


class AbsentLayer(nn.Module):
    """Stands for a layer another pipeline stage holds; keeps the global layer numbering."""

    def __init__(self, layer_number: int):
        super().__init__()
        self.layer_number = layer_number

    def forward(self, h, ctx):  # pragma: no cover - never called
        raise RuntimeError(f"layer {self.layer_number} lives on another pipeline stage")


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges; the first and last stage (embedding, final layer) get the smaller share."""
    if num_stages > num_layers:
        raise ValueError(f"parallel.pp: {num_stages} pipeline stages exceed num_layers={num_layers}")
    base, extra = divmod(num_layers, num_stages)
    # give the extra layers to the middle stages first, then the ends
    order = sorted(range(num_stages), key=lambda s: (s in (0, num_stages - 1), s))
    sizes = [base + (1 if s in order[:extra] else 0) for s in range(num_stages)]
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def trim_to_stage(model: MagiDiT, layers: range, first: bool, last: bool) -> MagiDiT:
    """Drop, in place, what this stage does not run."""
    blocks = model.videodit_blocks
    for i in range(len(blocks.layers)):
        if i not in layers:
            blocks.layers[i] = AbsentLayer(i)
    if not first:
        model.x_embedder = None
    if not last:
        model.final_linear = None
        blocks.final_layernorm = None
    return model


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands a contiguous gradient to the point-to-point send of the previous stage."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class PipelineStageModule(nn.Module):
    """One pipeline stage: (latent x | hidden h) -> (hidden h | velocity v)."""

    def __init__(self, shell: MagiDiT, stage_index: int, num_stages: int, layers: range,
                 sharding: SequenceSharding | None):
        super().__init__()
        self.shell = shell
        self.stage_index, self.num_stages = stage_index, num_stages
        self.layer_ids = list(layers)
        self.first, self.last = stage_index == 0, stage_index == num_stages - 1
        self.sharding = sharding if sharding is not None and sharding.shards > 1 else None
        self.autocast_dtype: torch.dtype | None = None

    @property
    def block_dtype(self) -> torch.dtype:
        layer = self.shell.videodit_blocks.layers[self.layer_ids[0]]
        return layer.mlp.layer_norm.weight.dtype

    def forward(self, inp: torch.Tensor, *, latent_shape, t, caption, caption_mask=None, caption_dropped=None,
                dt=None, chunk_offset: int = 0, kv_cache=None, cache_write: bool = False, lookback=None,
                layout=None) -> torch.Tensor:
        shell = self.shell
        if kv_cache is not None and layout is None:
            layout = self._cached_layout(latent_shape, kv_cache, chunk_offset, lookback)
        with _autocast(inp.device, self.autocast_dtype):
            ctx, grid = shell.build_context(latent_shape, t, caption, caption_mask, caption_dropped, dt,
                                            chunk_offset=chunk_offset, kv_cache=kv_cache, cache_write=cache_write,
                                            lookback=lookback, layout=layout)
            seq_len = ctx.layout.q_len
            if self.first:
                h = shell.embed_tokens(inp).to(self.block_dtype)
                if self.sharding is not None:
                    h, ctx = self.sharding.shard(h, ctx)
            else:
                h = _ContiguousGrad.apply(inp) if inp.requires_grad else inp
                if self.sharding is not None:
                    ctx = self.sharding.shard_context(ctx)
            for i in self.layer_ids:
                h = shell.videodit_blocks.layers[i](h, ctx)
            if not self.last:
                return h.contiguous()
            if self.sharding is not None:
                h = self.sharding.gather(h, seq_len)
            return shell.head(h, grid)


    def _cached_layout(self, latent_shape, kv_cache, chunk_offset, lookback):
        # build_context asks the cache about layer 0, which only the first stage holds: ask about our own layer
        from magi_train.model.chunk_layout import ChunkLayout

        cfg = self.shell.cfg
        _, _, T, H, W = latent_shape
        n = T // cfg.chunk_width
        per_chunk = (cfg.chunk_width // cfg.t_patch_size) * (H // cfg.patch_size) * (W // cfg.patch_size)
        cached = kv_cache.chunks(self.layer_ids[0])
        return ChunkLayout.causal(n, per_chunk, chunk_offset, cached, lookback)


def stage_shapes(cfg: ModelConfig, latent_shape, shards: int, block_dtype: torch.dtype):
    """(hidden state shape between stages, output velocity shape) for a microbatch of latent_shape."""
    B, _, T, H, W = latent_shape
    S = (T // cfg.t_patch_size) * (H // cfg.patch_size) * (W // cfg.patch_size)
    s_local = math.ceil(S / shards)
    out_ch = cfg.out_channels // 2 if cfg.half_channel_vae else cfg.out_channels
    return (s_local, B, cfg.hidden_size), (B, out_ch, T, H, W)


def stage_rank(stage: int, pp: int) -> int:
    """Pipeline-group rank holding a (virtual) stage: loop order, rank r holds r, r+pp, r+2pp, ..."""
    return stage % pp


def split_model_kwargs(kwargs: dict) -> tuple[torch.Tensor, dict]:
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    kwargs["latent_shape"] = tuple(x.shape)
    return x, kwargs


class PipelineRunner:
    """Builds (and caches per microbatch shape) the torch.distributed.pipelining stages and schedule."""

    def __init__(self, submods: list[nn.Module], stages: list[PipelineStageModule], env, cfg: ModelConfig,
                 schedule: str):
        self.submods = submods              # what pipelining runs (FSDP/DDP-wrapped stage modules)
        self.stage_modules = stages         # the stage modules themselves (metadata)
        self.env = env
        self.cfg = cfg
        self.schedule_name = schedule
        self._cache: dict = {}
        self.loss_fn: Callable | None = None

    def _loss(self, output, target):
        return self.loss_fn(output, target)

    def schedule(self, x_mb: torch.Tensor, n_microbatches: int, shards: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        key = (tuple(x_mb.shape), x_mb.dtype, n_microbatches)
        if key in self._cache:
            return self._cache[key]
        env, device = self.env, self.env.device
        hidden, out = stage_shapes(self.cfg, x_mb.shape, shards, self.stage_modules[0].block_dtype)
        pstages = []
        for sub, m in zip(self.submods, self.stage_modules):
            # requires_grad on hidden states tells the stage to send/receive their gradients
            inp = torch.empty(x_mb.shape, dtype=x_mb.dtype, device="meta") if m.first else \
                torch.empty(hidden, dtype=m.block_dtype, device="meta", requires_grad=True)
            outp = torch.empty(out, dtype=torch.float32, device="meta", requires_grad=True) if m.last else \
                torch.empty(hidden, dtype=m.block_dtype, device="meta", requires_grad=True)
            pstages.append(PipelineStage(sub, m.stage_index, m.num_stages, device, input_args=(inp,),
                                         output_args=(outp,), group=env.pp_group))
        if self.schedule_name == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(pstages, n_microbatches, loss_fn=self._loss, scale_grads=False)
        elif self.schedule_name == "gpipe":
            sched = ScheduleGPipe(pstages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            sched = Schedule1F1B(pstages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        self._cache[key] = sched
        return sched


@torch.no_grad()
def pipeline_forward(stages: list[PipelineStageModule], env, cfg: ModelConfig, model_kwargs: dict,
                     shards: int, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One forward (inference) through all stages with plain point-to-point sends; every rank returns v."""
    x, kwargs = split_model_kwargs(model_kwargs)
    num_stages = stages[0].num_stages
    pp = env.pp
    mine = {m.stage_index: m for m in stages}
    hidden, out_shape = stage_shapes(cfg, x.shape, shards, stages[0].block_dtype)
    h = None
    for s in range(num_stages):
        if s in mine:
            m = mine[s]
            m.autocast_dtype = autocast_dtype
            if s > 0 and env.pp_ranks[stage_rank(s - 1, pp)] != env.rank:
                h = torch.empty(hidden, dtype=m.block_dtype, device=env.device)
                dist.recv(h, src=env.pp_ranks[stage_rank(s - 1, pp)], group=env.pp_group)
            h = m(x if s == 0 else h, **kwargs)
            if s < num_stages - 1 and env.pp_ranks[stage_rank(s + 1, pp)] != env.rank:
                dist.send(h.contiguous(), dst=env.pp_ranks[stage_rank(s + 1, pp)], group=env.pp_group)
    last_owner = env.pp_ranks[stage_rank(num_stages - 1, pp)]
    v = h.contiguous() if last_owner == env.rank else torch.empty(out_shape, dtype=torch.float32, device=env.device)
    dist.broadcast(v, src=last_owner, group=env.pp_group)
    return v
