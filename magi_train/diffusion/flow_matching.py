"""The flow-matching training objective, split in two so that a pipeline schedule can call the halves apart:

    model_kwargs, target, loss_weight = prepare_inputs(batch, generator, flow_cfg, chunk_width)
    v_pred = model(**model_kwargs)
    loss = loss_from_output(v_pred, target, loss_weight)

Convention (MAGI-1): t in [0, 1] with 1 = clean, x_t = t * x1 + (1 - t) * noise, target velocity v = x1 - noise.
t is drawn per chunk (t_sampler.py); clean prefix chunks enter unnoised and carry loss weight 0; caption dropout
swaps a sample's caption for the model's learned null caption (the model does the swap, given the flags)."""
from __future__ import annotations

import torch

from .context_encoding import context_flags
from .t_sampler import ChunkNoise, sample_chunk_t


def expand_to_frames(per_chunk: torch.Tensor, chunk_width: int) -> torch.Tensor:
    """[B, n] -> [B, 1, n*chunk_width, 1, 1], broadcastable against a latent [B, C, T, H, W]."""
    return per_chunk.repeat_interleave(chunk_width, dim=1)[:, None, :, None, None]


def noisy_latent(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, chunk_width: int,
                 clean: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = t * x1 + (1 - t) * noise per chunk; clean chunks are x1 exactly."""
    tt = expand_to_frames(t.to(x1.dtype), chunk_width)
    x_t = tt * x1 + (1 - tt) * noise
    if clean is not None and bool(clean.any()):
        x_t = torch.where(expand_to_frames(clean, chunk_width), x1, x_t)
    return x_t


def velocity_target(x1: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return x1 - noise


def num_chunks_of(latent: torch.Tensor, chunk_width: int) -> int:
    frames = latent.shape[2]
    if frames % chunk_width:
        raise ValueError(f"data: a batch has {frames} latent frames, not a multiple of model.chunk_width={chunk_width}"
                         f" (set data.num_frames to a multiple of it)")
    return frames // chunk_width


def prepare_inputs(batch: dict, generator: torch.Generator, cfg, chunk_width: int, device=None,
                   noise_levels: ChunkNoise | None = None, caption_dropout: float | None = None,
                   served_cfg_number: int = 3):
    """Batch -> (model_kwargs, target, loss_weight); deterministic given the generator.

    batch: latent [B, C, T, H, W], text_emb [B, L, D], text_mask [B, L]. cfg: FlowMatchingConfig.
    The draws happen in a fixed order on `generator` (t, clean prefix, caption dropout, noise), on its device.
    noise_levels overrides the t draw (validation uses fixed t); caption_dropout overrides cfg.caption_dropout.
    served_cfg_number: how the model is served, which decides the flag of clean context chunks (context_encoding:
    3 base models, 1 distilled ones; cfg 1 adds model_kwargs["caption_null"]).
    loss_weight [B, n]: 1 for noisy chunks, 0 for clean ones."""
    device = torch.device(device) if device is not None else generator.device
    x1 = batch["latent"].to(device=device, dtype=torch.float32)
    B = x1.shape[0]
    n = num_chunks_of(x1, chunk_width)
    levels = noise_levels if noise_levels is not None else sample_chunk_t(B, n, cfg, generator, device)
    p_drop = cfg.caption_dropout if caption_dropout is None else caption_dropout
    dropped = torch.rand(B, generator=generator, device=device) < p_drop
    noise = torch.randn(x1.shape, generator=generator, device=device, dtype=x1.dtype)
    t, clean = levels.t.to(device), levels.clean.to(device)
    # [B, n]: dropped samples, and clean context chunks when they are encoded as inference caches them
    caption_dropped, caption_null = context_flags(clean & cfg.null_caption_on_clean, dropped, served_cfg_number)
    model_kwargs = {
        "x": noisy_latent(x1, noise, t, chunk_width, clean),
        "t": t,
        "caption": batch["text_emb"].to(device=device, dtype=torch.float32),
        "caption_mask": batch["text_mask"].to(device=device, dtype=torch.bool),
        "caption_dropped": caption_dropped,
    }
    if caption_null is not None:
        model_kwargs["caption_null"] = caption_null
    loss_weight = (~clean).to(torch.float32)
    return model_kwargs, velocity_target(x1, noise), loss_weight


def chunk_mse(v_pred: torch.Tensor, target: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """Mean squared error per chunk: [B, C, T, H, W] x2 -> [B, n] (fp32)."""
    err = (v_pred.float() - target.float()).square()
    B, C, T, H, W = err.shape
    return err.reshape(B, C, num_chunks, T // num_chunks, H, W).mean(dim=(1, 3, 4, 5))


def weighted_chunk_loss(per_chunk: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
    w = loss_weight.to(per_chunk.dtype)
    return (per_chunk * w).sum() / w.sum().clamp(min=1.0)


def loss_from_output(v_pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean of per-chunk MSE; chunks of weight 0 (clean prefix) do not count."""
    return weighted_chunk_loss(chunk_mse(v_pred, target, loss_weight.shape[1]), loss_weight)


class TBinStats:
    """Loss per t bin (bins given by inner edges), accumulated over microbatches; for logging only."""

    def __init__(self, edges: list[float]):
        self.edges = list(edges)
        self.reset()

    def reset(self) -> None:
        self.sums = [0.0] * (len(self.edges) + 1)
        self.counts = [0] * (len(self.edges) + 1)

    def add(self, per_chunk_loss: torch.Tensor, t: torch.Tensor, weight: torch.Tensor) -> None:
        edges = torch.tensor(self.edges, dtype=torch.float32)
        loss, tt, w = per_chunk_loss.detach().float().cpu(), t.detach().float().cpu(), weight.detach().cpu() > 0
        bins = torch.bucketize(tt, edges, right=True)
        for b in range(len(self.sums)):
            sel = (bins == b) & w
            self.sums[b] += float(loss[sel].sum())
            self.counts[b] += int(sel.sum())

    def labels(self) -> list[str]:
        bounds = [0.0] + self.edges + [1.0]
        return [f"t{bounds[i]:.2f}-{bounds[i + 1]:.2f}" for i in range(len(bounds) - 1)]

    def summary(self) -> dict[str, float]:
        """{'t0.00-0.25': mean loss, ...}; bins without chunks are left out."""
        return {label: s / c for label, s, c in zip(self.labels(), self.sums, self.counts, strict=True) if c}


class FlowMatchingLoss:
    """loss_fn(v_pred, target, loss_weight) -> scalar, as forward_backward calls it; it also keeps each call's
    per-chunk losses (detached) so the trainer can bin them by t after the step."""

    def __init__(self):
        self.chunk_losses: list[torch.Tensor] = []

    def __call__(self, v_pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
        per_chunk = chunk_mse(v_pred, target, loss_weight.shape[1])
        self.chunk_losses.append(per_chunk.detach())
        return weighted_chunk_loss(per_chunk, loss_weight)

    def pop(self) -> list[torch.Tensor]:
        out, self.chunk_losses = self.chunk_losses, []
        return out


__all__ = ["prepare_inputs", "loss_from_output", "chunk_mse", "noisy_latent", "velocity_target", "expand_to_frames",
           "weighted_chunk_loss", "num_chunks_of", "TBinStats", "FlowMatchingLoss"]
