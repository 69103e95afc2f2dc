"""Pipeline parallelism: the DiT cut at block boundaries into stages run by torch.distributed.pipelining.

Each stage is a "shell" of the MagiDiT: the same module tree with the layers of other stages replaced by
pass-through placeholders (so parameter names stay MAGI-1's) and the patch embedding / final layer only where
they run. A stage runs MagiDiT.forward itself, which skips what the shell does not hold (as torchtitan's
Transformer.forward does). Every stage rebuilds the cheap per-forward context (timestep and caption embeddings,
RoPE, chunk layout) from the microbatch's inputs, which pipelining passes to every stage as keyword arguments;
only the hidden states travel between stages. The embedders therefore live on every stage and their gradients
are summed over the pipeline (finalize_grads). The schedule is driven through pipelining's public `step`."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config import ModelConfig
from magi_train.model.dit import MagiDiT


# parameters every pipeline stage holds a copy of (gradients summed over the pipeline group)
PIPELINE_SHARED_PREFIXES = ("t_embedder.", "y_embedder.", "rope.")


class AbsentLayer(nn.Module):
    """Stands for a layer another pipeline stage holds; keeps the global layer numbering (MagiDiT.forward runs
    only the layers its shell holds)."""

    def __init__(self, layer_number: int):
        super().__init__()
        self.layer_number = layer_number


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


def is_first_stage(shell: MagiDiT) -> bool:
    return shell.x_embedder is not None


def is_last_stage(shell: MagiDiT) -> bool:
    return shell.final_linear is not None


def stage_shapes(cfg: ModelConfig, latent_shape, shards: int):
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
    """MagiDiT kwargs -> (latent x, the kwargs every stage gets: latent_shape instead of x)."""
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    kwargs["latent_shape"] = tuple(x.shape)
    return x, kwargs


def pack_target(target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """pipelining hands the loss one target tensor per microbatch: the velocity target and the per-chunk loss
    weight travel together, [B, target numel / B + n]."""
    B = target.shape[0]
    return torch.cat([target.reshape(B, -1), weight.to(target.dtype).reshape(B, -1)], dim=1)


def unpack_target(packed: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = output[0].numel()
    return packed[:, :n].reshape(output.shape), packed[:, n:]


class PipelineRunner:
    """Builds (and caches per microbatch shape) the torch.distributed.pipelining stages and schedule."""

    def __init__(self, submods: list[nn.Module], shells: list[MagiDiT], stage_ids: list[int], num_stages: int,
                 env, cfg: ModelConfig, schedule: str):
        self.submods = submods              # what pipelining runs (the shells, FSDP/DDP-wrapped)
        self.shells, self.stage_ids, self.num_stages = shells, stage_ids, num_stages
        self.env = env
        self.cfg = cfg
        self.schedule_name = schedule
        self._cache: dict = {}
        self.loss_fn: Callable | None = None

    def _loss(self, output, packed_target):
        return self.loss_fn(output, *unpack_target(packed_target, output))

    def schedule(self, x_mb: torch.Tensor, n_microbatches: int, shards: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        key = (tuple(x_mb.shape), x_mb.dtype, n_microbatches)
        if key in self._cache:
            return self._cache[key]
        env, device = self.env, self.env.device
        hidden, out = stage_shapes(self.cfg, x_mb.shape, shards)
        pstages = []
        for sub, shell, s in zip(self.submods, self.shells, self.stage_ids):
            # requires_grad on hidden states tells the stage to send/receive their gradients
            inp = torch.empty(x_mb.shape, dtype=x_mb.dtype, device="meta") if is_first_stage(shell) else \
                torch.empty(hidden, dtype=shell.dtype, device="meta", requires_grad=True)
            outp = torch.empty(out, dtype=torch.float32, device="meta", requires_grad=True) if is_last_stage(shell) \
                else torch.empty(hidden, dtype=shell.dtype, device="meta", requires_grad=True)
            pstages.append(PipelineStage(sub, s, self.num_stages, device, input_args=(inp,), output_args=(outp,),
                                         group=env.pp_group))
        if self.schedule_name == "interleaved_1f1b":
            sched = ScheduleInterleaved1F1B(pstages, n_microbatches, loss_fn=self._loss, scale_grads=False)
        elif self.schedule_name == "gpipe":
            sched = ScheduleGPipe(pstages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            sched = Schedule1F1B(pstages[0], n_microbatches, loss_fn=self._loss, scale_grads=False)
        self._cache[key] = sched
        return sched


@torch.no_grad()
def pipeline_forward(shells: list[MagiDiT], stage_ids: list[int], num_stages: int, env, cfg: ModelConfig,
                     model_kwargs: dict, shards: int) -> torch.Tensor:
    """One forward (inference) through all stages with plain point-to-point sends; every rank returns v."""
    x, kwargs = split_model_kwargs(model_kwargs)
    pp = env.pp
    mine = dict(zip(stage_ids, shells))
    hidden, out_shape = stage_shapes(cfg, x.shape, shards)
    h = None
    for s in range(num_stages):
        if s in mine:
            shell = mine[s]
            if s > 0 and env.pp_ranks[stage_rank(s - 1, pp)] != env.rank:
                h = torch.empty(hidden, dtype=shell.dtype, device=env.device)
                dist.recv(h, src=env.pp_ranks[stage_rank(s - 1, pp)], group=env.pp_group)
            h = shell(x if s == 0 else h, **kwargs)
            if s < num_stages - 1 and env.pp_ranks[stage_rank(s + 1, pp)] != env.rank:
                dist.send(h.contiguous(), dst=env.pp_ranks[stage_rank(s + 1, pp)], group=env.pp_group)
    last_owner = env.pp_ranks[stage_rank(num_stages - 1, pp)]
    v = h.contiguous() if last_owner == env.rank else torch.empty(out_shape, dtype=torch.float32, device=env.device)
    dist.broadcast(v, src=last_owner, group=env.pp_group)
    return v
