"""Training noise levels: one t per chunk, non-increasing along the chunk index (later chunks noisier).

Every t distribution is written as a quantile function (inverse CDF) of a progress value p in [0, 1]. The chunk
schedules only decide the p of each chunk; a monotone quantile keeps their order:
  sorted     iid p per chunk, sorted descending: the pooled t of all chunks follow the distribution exactly
  shared     one p for every noisy chunk of a sample
  staggered  chunk k lags k/stagger_window behind the sample's first noisy chunk, as chunks do in the
             inference window (each chunk enters the window that many steps after its predecessor)
Clean prefix chunks (probability clean_prefix_prob) get t = clean_t, are given to the model unnoised, and are
excluded from the loss: they teach continuation from context (I2V/V2V)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import shift_time  # the inference schedule's shift: one definition for both sides

_EPS = 1e-6


def t_quantile(p: torch.Tensor, cfg) -> torch.Tensor:
    """Inverse CDF of the configured t distribution (cfg: FlowMatchingConfig), increasing in p."""
    if cfg.t_distribution == "uniform":
        t = p
    elif cfg.t_distribution == "logit_normal":
        z = torch.special.ndtri(p.clamp(_EPS, 1 - _EPS))
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    elif cfg.t_distribution == "inference":
        t = p.clamp(0, 1) ** cfg.inference_power
    else:
        raise ValueError(f"train.flow.t_distribution: unknown {cfg.t_distribution!r}")
    return t if cfg.shift == 1.0 else shift_time(t, cfg.shift)


@dataclass
class ChunkNoise:
    t: torch.Tensor        # [B, n] float32, non-increasing along n
    clean: torch.Tensor    # [B, n] bool: clean prefix chunks (t = clean_t, unnoised, no loss)


def clean_prefix_lengths(batch: int, n: int, cfg, generator: torch.Generator, device) -> torch.Tensor:
    """[B] int: clean chunks at the start of each sample; never all chunks."""
    draw = torch.rand(batch, generator=generator, device=device) < cfg.clean_prefix_prob
    longest = min(cfg.max_clean_prefix_chunks, n - 1)
    length = torch.randint(1, max(longest, 1) + 1, (batch,), generator=generator, device=device)
    return torch.where(draw & (longest >= 1), length, torch.zeros_like(length))


def sample_chunk_t(batch: int, n: int, cfg, generator: torch.Generator, device=None) -> ChunkNoise:
    """Draw t [B, n] for n chunks; deterministic given the generator. cfg: FlowMatchingConfig."""
    device = device if device is not None else generator.device
    u = torch.rand(batch, n, generator=generator, device=device)
    prefix = clean_prefix_lengths(batch, n, cfg, generator, device)
    index = torch.arange(n, device=device)
    clean = index[None, :] < prefix[:, None]
    if cfg.chunk_schedule == "sorted":
        # clean slots get p = 2 so that sorting puts them first; the noisy rest are iid draws, sorted
        p = torch.sort(torch.where(clean, torch.full_like(u, 2.0), u), dim=1, descending=True).values
    elif cfg.chunk_schedule == "shared":
        p = u[:, :1].expand(batch, n)
    elif cfg.chunk_schedule == "staggered":
        # the first noisy chunk (index = prefix length) leads; each later one lags 1/window behind
        lag = (index[None, :] - prefix[:, None]).clamp(min=0).to(u.dtype) / cfg.stagger_window
        p = (u[:, :1] - lag).clamp(min=0.0)
    else:
        raise ValueError(f"train.flow.chunk_schedule: unknown {cfg.chunk_schedule!r}")
    t = t_quantile(p.clamp(0.0, 1.0), cfg).clamp(0.0, cfg.clean_t)
    t = torch.where(clean, torch.full_like(t, cfg.clean_t), t)
    return ChunkNoise(t=t.float(), clean=clean)


__all__ = ["ChunkNoise", "sample_chunk_t", "t_quantile", "clean_prefix_lengths"]
